"""``rvl pretrain``: the Accelerate training loop for the multi-view study/report model, top to bottom.

Runs unchanged on 1 CPU/GPU (``rvl pretrain ...``), many GPUs / nodes (``accelerate launch -m rvl pretrain ...``,
``torchrun -m rvl pretrain ...``) and 2+ CPU processes (gloo; add ``--cpu``).

Exact resume: every source of randomness is a function of (seed, epoch, index) or (seed, step, rank), never of the
global RNG stream position: the sampler permutes with a per-epoch generator, each study's augmentation runs under a
per-(epoch, index) seed, and the model's dropout under a per-micro-step seed. A run restarted from a checkpoint
therefore replays exactly the batches and randomness of an uninterrupted run (``skip_first_batches`` mid-epoch).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from rvl.config import Config, add_config_arguments, config_from_args, save_config
from rvl.train_support import (CHECKPOINT_PREFIX, Collate, EpochSampler, SeededStudies, TrainState, collapse_message,
                               evaluate, list_checkpoints, save_checkpoint, verify_checkpoint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as err:
        print(f"rvl pretrain: {err}", file=sys.stderr)
        return 2
    if cfg.model.text_pooling not in (None, "report", "sentences"):
        print(f"rvl pretrain: --text-pooling must be report or sentences, got {cfg.model.text_pooling!r}",
              file=sys.stderr)
        return 2
    if cfg.model.caption_vocab not in ("full", "train"):
        print(f"rvl pretrain: --caption-vocab must be full or train, got {cfg.model.caption_vocab!r}", file=sys.stderr)
        return 2
    if not cfg.data.source or not Path(cfg.data.source).exists():
        print(f"rvl pretrain: --data must be a prepared cache or manifest, got {cfg.data.source!r}", file=sys.stderr)
        return 2
    from rvl.fileio import OutputBusyError, exclusive_output
    from rvl.integrity import IntegrityError

    out_dir = Path(cfg.train.output_dir)
    try:  # one run per output folder: the main process holds the lock (other ranks of a launch share its folder)
        with exclusive_output(out_dir / ".pretrain.lock", f"the run folder {out_dir}") if \
                int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
            return train(cfg)
    except (IntegrityError, OutputBusyError) as err:  # an altered cache or checkpoint, or a second run on the folder
        print(f"rvl pretrain: error: {err}", file=sys.stderr)
        return 2


def model_overrides(cfg) -> dict:
    """Model-config keys that follow from the training config (fusion choice, label head when its objective is on)."""
    overrides = {"fusion": cfg.model.fusion} if cfg.model.fusion else {}
    if cfg.objectives.label_head_weight > 0:
        overrides["label_head"] = True
    return overrides


# ---------------------------------------------------------------------------------------------------- training
def build_optimizer(model, cfg: Config, pretrained: set[str] = frozenset()):
    """AdamW; no weight decay on 1-d params, biases, norms, embeddings' positions and the temperature (open_clip).

    Parameters loaded from pretrained weights (``pretrained`` names) train at ``optim.pretrained_lr``: at the new parts'
    lr a pretrained text tower collapses to one embedding for every text, and one low lr for all starves the new parts.
    """
    import torch

    lrs = {False: cfg.optim.lr, True: cfg.optim.pretrained_lr if cfg.optim.pretrained_lr is not None else cfg.optim.lr}
    buckets: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "bias" in name or "ln" in name or "norm" in name or "logit_scale" in name
        buckets.setdefault((name in pretrained, skip), []).append(param)
    groups = [{"params": params, "lr": lrs[loaded], "weight_decay": 0.0 if skip else cfg.optim.weight_decay}
              for (loaded, skip), params in sorted(buckets.items())]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)


def build_model(cfg: Config, tok_dir: Path, train_reports=None, is_main: bool = True, wait=lambda: None):
    """The model ``cfg.model`` describes, and its :class:`rvl.model.sources.LoadReport`.

    A locally built BERT text tower gets a WordPiece vocabulary trained once on the training reports (``tok_dir``,
    reused on resume); a pretrained text tower brings its own tokenizer.
    """
    from rvl.model import report_text_for_model
    from rvl.model.factory import get_model_config, train_wordpiece
    from rvl.model.sources import build_from_init

    init = cfg.model.init or cfg.model.pretrained
    model_cfg = get_model_config(cfg.model.name) if not init and not cfg.model.text_tower else None
    spec = model_cfg["rvl_cfg"].get("text_tower") if model_cfg else None  # a locally built text tower
    if spec and is_main and not tok_dir.exists():
        tmp = tok_dir.parent / ".tmp-tokenizer"
        shutil.rmtree(tmp, ignore_errors=True)
        texts = [report_text_for_model(r) for r in train_reports]
        context = model_cfg["text_cfg"].get("context_length", 128)
        train_wordpiece(texts, int(spec.get("vocab_size", 8000)), tmp, context)
        os.replace(tmp, tok_dir)
    wait()
    return build_from_init(cfg.model.name, init, text_tower=cfg.model.text_tower, image_tower=cfg.model.image_tower,
                           rvl_overrides=model_overrides(cfg), text_dir=tok_dir if spec else None)


def train(cfg: Config) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from rvl.data import StudyDataset
    from rvl.model.loss import RVLLoss
    from rvl.model.sources import TowerMismatchError, lock_towers
    from rvl.text_sampling import ReportSentenceSampler

    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    use_cpu = cfg.train.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    mixed = cfg.optim.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and not use_cpu else "no"
    log_with = None if cfg.train.log_with == "none" else cfg.train.log_with
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed, gradient_accumulation_steps=cfg.optim.grad_accum,
                              log_with=log_with, project_dir=str(out_dir))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = get_logger(__name__)  # main process only unless main_process_only=False
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per saved file otherwise
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    # ---- data
    train_set = StudyDataset(cfg.data.source, split=cfg.data.train_split, max_views=cfg.data.max_views, train=True,
                             seed=cfg.train.seed, strict=cfg.data.strict)
    # ---- model: towers from --init / --text-tower / --image-tower, rvl's own parts fresh
    try:
        model, load_report = build_model(cfg, out_dir / "tokenizer", train_set.frame["report"].astype(str),
                                         accelerator.is_main_process, accelerator.wait_for_everyone)
    except (ValueError, FileNotFoundError, TowerMismatchError) as err:  # a bad --init / tower source
        print(f"rvl pretrain: {err}", file=sys.stderr)
        return 2
    lock_towers(model, cfg.model.lock_image, cfg.model.lock_image_unlocked_groups,
                cfg.model.lock_image_freeze_bn_stats, cfg.model.lock_text, cfg.model.lock_text_unlocked_layers,
                cfg.model.lock_text_freeze_layer_norm)
    if cfg.model.text_pooling:  # recorded in rvl_cfg: the export embeds texts the same way
        model.rvl_cfg = {**model.rvl_cfg, "text_pooling": cfg.model.text_pooling}
    if cfg.model.caption_vocab == "train" and cfg.objectives.caption_weight > 0:
        size = model.restrict_caption_vocab(list(train_set.frame["report"].astype(str)))
        logger.info(f"caption decoder vocabulary: the {size - 1} token ids of the training reports + 1 for others")
    if cfg.model.cache_text_features:
        try:
            model.enable_text_feature_cache()
        except ValueError as err:
            print(f"rvl pretrain: --cache-text-features: {err}", file=sys.stderr)
            return 2
    logger.info("model initialisation:\n" + load_report.recount(model).table())
    train_set.image_transform = model.preprocess_train
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.objectives.caption_weight <= 0:  # unused params would stall DDP's gradient reduction
        model.caption_decoder.requires_grad_(False)
    sentences = ReportSentenceSampler(cfg.data.sentence_sampling) if cfg.data.sentence_sampling > 0 else None
    collate = Collate(model.tokenize_reports, sentences)
    seeded = SeededStudies(train_set, cfg.train.seed, sentences)
    sampler = EpochSampler(len(seeded), cfg.train.seed)
    train_dl = DataLoader(seeded, batch_size=cfg.optim.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=cfg.data.num_workers, drop_last=True)  # equal batches on every rank
    val_dl = None
    try:
        val_set = StudyDataset(cfg.data.source, split=cfg.data.val_split, max_views=cfg.data.max_views, train=False,
                               image_transform=model.preprocess, seed=cfg.train.seed)
        if len(val_set) > cfg.data.max_val_studies:
            val_set = Subset(val_set, range(cfg.data.max_val_studies))
        if len(val_set):
            val_dl = DataLoader(val_set, batch_size=cfg.optim.batch_size, collate_fn=collate,
                                num_workers=cfg.data.num_workers)
    except (ValueError, KeyError) as err:
        logger.warning(f"no validation split {cfg.data.val_split!r}: {err}")

    optimizer = build_optimizer(model, cfg, load_report.pretrained)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.optim.warmup_steps * world, cfg.optim.max_steps * world)
    if cfg.model.compile:
        model.compile()
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    if val_dl is not None:
        val_dl = accelerator.prepare(val_dl)
    loss_fn = RVLLoss(cfg.objectives.contrastive_weight, cfg.objectives.label_aware_weight,
                      cfg.objectives.caption_weight, pad_id=accelerator.unwrap_model(model).caption_pad_id, rank=rank,
                      world_size=world, label_head_weight=cfg.objectives.label_head_weight)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    # ---- resume
    if cfg.train.resume:
        found = list_checkpoints(ckpt_dir)
        if found:
            verify_checkpoint(found[-1], ckpt_dir)
            accelerator.load_state(str(found[-1]))
            logger.info(f"resumed from {found[-1]} (step {state.step})")
        else:
            logger.info(f"--resume: no checkpoint in {ckpt_dir}, starting fresh")
    if log_with:
        accelerator.init_trackers("rvl-pretrain", config=cfg.flat())
    if load_report.pretrained and val_dl is not None and state.step == 0:  # the collapse check's reference point
        metrics = evaluate(accelerator, model, val_dl)
        state.start_spread = {k: v for k, v in metrics.items() if k.endswith("_mean_cosine")}
        logger.info("before training: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "/" not in k))

    # ---- loop
    batches_per_epoch = len(train_dl)
    if batches_per_epoch == 0:
        raise SystemExit(f"rvl pretrain: {len(train_set)} training studies < batch size x processes "
                         f"({cfg.optim.batch_size} x {world}); lower --batch-size")
    pairs_per_step = cfg.optim.batch_size * world * cfg.optim.grad_accum
    progress = tqdm(total=cfg.optim.max_steps, initial=state.step, desc="pretrain",
                    disable=not accelerator.is_local_main_process)
    bad_in_row, started, steps_this_run = 0, time.perf_counter(), 0
    running: dict[str, float] = {}
    net = accelerator.unwrap_model(model)
    while state.step < cfg.optim.max_steps:
        epoch, skip = divmod(state.micro_step, batches_per_epoch)
        seeded.set_epoch(epoch), sampler.set_epoch(epoch), train_dl.set_epoch(epoch)
        epoch_dl = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        accelerator.step = skip  # accumulation phase within the epoch (Accelerate resets it at each epoch end)
        for batch in epoch_dl:
            state.micro_step += 1
            with accelerator.accumulate(model):
                torch.manual_seed((cfg.train.seed * 1_000_003 + state.micro_step) * 1_009 + rank)  # dropout
                with accelerator.autocast():
                    out = model(batch["images"], batch["view_mask"], batch["view_types"], batch["text"],
                                caption=cfg.objectives.caption_weight > 0)
                losses = loss_fn(out, batch["labels"], text_labels=batch["text_labels"],
                                 text_is_sentence=batch["text_is_sentence"])
                finite = torch.isfinite(losses["total"].detach()).float()
                if accelerator.reduce(finite, "sum").item() == world:  # every rank agrees to step or to skip
                    accelerator.backward(losses["total"])
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    bad_in_row = 0
                else:
                    bad_in_row += 1
                    logger.warning(f"non-finite loss at step {state.step} ({bad_in_row} in a row): step skipped")
                    if bad_in_row >= cfg.train.max_bad_steps:
                        found = list_checkpoints(ckpt_dir)
                        raise SystemExit(f"rvl pretrain: {bad_in_row} non-finite losses in a row at step {state.step};"
                                         f" stopping. Last good checkpoint: {found[-1] if found else 'none'}")
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():  # open_clip clamps the temperature at 100
                    net.logit_scale.clamp_(0, math.log(100))
            for key, value in losses.items():
                running[key] = running.get(key, 0.0) + float(value.detach())
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            steps_this_run += 1
            progress.update(1)
            pairs_s = steps_this_run * pairs_per_step / (time.perf_counter() - started)
            if state.step % cfg.train.log_every == 0 or state.step == cfg.optim.max_steps:
                n = cfg.train.log_every * cfg.optim.grad_accum
                logs = {f"train/loss_{k}": v / n for k, v in running.items()}
                logs.update({"train/lr": scheduler.get_last_lr()[0], "train/logit_scale": net.logit_scale.exp().item(),
                             "train/pairs_per_s": pairs_s})
                accelerator.log(logs, step=state.step)
                progress.set_postfix(loss=f"{logs.get('train/loss_total', float('nan')):.3f}", pairs_s=f"{pairs_s:.1f}")
                running = {}
            if val_dl is not None and (state.step % cfg.train.eval_every == 0 or state.step == cfg.optim.max_steps):
                metrics = evaluate(accelerator, model, val_dl)
                accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
                logger.info(f"step {state.step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                                 if "/" not in k))
                collapsed = collapse_message(metrics, state.start_spread, cfg.train.collapse_ratio)
                if collapsed:
                    logger.warning(f"step {state.step}: {collapsed}")
                    if cfg.train.stop_on_collapse:
                        found = list_checkpoints(ckpt_dir)
                        raise SystemExit(f"rvl pretrain: {collapsed}; stopping (--no-stop-on-collapse to go on). "
                                         f"Last checkpoint: {found[-1] if found else 'none'}")
                score = metrics.get("zeroshot_macro_auc", metrics.get("study_to_report_R@1", -math.inf))
                if score > state.best_metric:
                    state.best_metric = score
                    save_checkpoint(accelerator, ckpt_dir, "best", keep_last=None)
                    if accelerator.is_main_process:
                        (ckpt_dir / "best.json").write_text(json.dumps({"step": state.step, **metrics}, indent=2))
            if state.step % cfg.train.save_every == 0 or state.step == cfg.optim.max_steps:
                save_checkpoint(accelerator, ckpt_dir, f"{CHECKPOINT_PREFIX}{state.step:08d}", cfg.train.keep_last)
            if state.step >= cfg.optim.max_steps:
                break
    progress.close()

    # ---- export
    skipped = getattr(train_set, "skipped", 0)
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    full_state = accelerator.get_state_dict(model) if sharded else None  # collective: every rank takes part
    if accelerator.is_main_process:
        if sharded:  # rebuild an unsharded copy to export
            net, _ = build_model(cfg, out_dir / "tokenizer")
            net.load_state_dict(full_state)
        net.save_pretrained(out_dir / "model")
        seconds = max(time.perf_counter() - started, 1e-9)
        summary = {"steps": state.step, "pairs_per_s": steps_this_run * pairs_per_step / seconds,
                   "skipped_studies": int(skipped if isinstance(skipped, int) else len(skipped)),
                   "init": [{"part": p, "source": src, "parameters": n} for p, src, n in load_report.rows],
                   "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad)}
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info(f"exported {out_dir / 'model'}; {summary}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rvl pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
