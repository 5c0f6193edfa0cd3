"""One fine-tuning run: a linear probe on cached frozen embeddings, or full fine-tuning of the image side.

Full fine-tuning has ``rvl pretrain``'s habits: Accelerate (bf16 on GPU), AdamW with warmup + cosine, every source of
randomness a function of (seed, epoch, index) or (seed, step) (``EpochSampler``, ``SeededStudies``, CutMix seeded per
step), atomic checkpoints of model + optimizer + scheduler + counters, and exact ``--resume`` mid-run
(``skip_first_batches``). The number of steps is fixed: no early stopping or selection on the test split.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rvl.constants import CHEXPERT_LABELS
from rvl.finetune.losses import label_targets, masked_loss, positive_weights

__all__ = ["FinetuneSettings", "PatientSubset", "study_features", "predict", "train_linear", "train_full"]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    """Everything a run's result depends on besides (init, mode, fraction, seed) and the data."""

    labels: list[str] = field(default_factory=list)
    model: str = "rvl-demo"             # model config of --init scratch
    views: str = "study"                # study (all views, fused) | frontal (one view, frontal first)
    loss: str = "bce"                   # bce | asl | focal
    pos_weight: str = "none"            # none | auto
    uncertain: str = "ignore"           # ignore | zeros | ones
    blank: str = "negative"             # negative | ignore
    cutmix: float = 0.0                 # CutMix alpha (full mode), 0 = off
    cut_remain: float = 0.0             # Cut&Remain share of boxed images (full mode), 0 = off
    max_steps: int = 200                # full fine-tuning steps
    batch_size: int = 32
    lr: float = 3e-4
    head_lr_scale: float = 10.0         # the fresh head's lr = lr x this (full mode): it starts from nothing
    weight_decay: float = 0.05
    warmup_steps: int = 20
    layer_decay: float = 0.0            # 0 = off; else timm layer-wise lr decay of the image tower
    linear_steps: int = 300             # linear-probe steps (full batch)
    linear_lr: float = 1e-2
    save_every: int = 50
    mixed_precision: str = "auto"
    cpu: bool = False

    def augmentations(self, mode: str) -> str:
        """Tag of the augmentations a run of ``mode`` uses (none for a linear probe on frozen embeddings)."""
        if mode == "linear":
            return "none"
        tags = ([f"cutmix{self.cutmix:g}"] if self.cutmix > 0 else []) + \
            ([f"cutremain{self.cut_remain:g}"] if self.cut_remain > 0 else [])
        return "+".join(tags) or "none"


class PatientSubset(torch.utils.data.Dataset):
    """The studies of a dataset whose ``patient_id`` is in ``patients`` (epoch forwarded for seeded sampling)."""

    def __init__(self, dataset: Any, patients: Sequence[str]):
        wanted = set(patients)
        self.dataset = dataset
        self.rows = [i for i, p in enumerate(dataset.frame["patient_id"].astype(str)) if p in wanted]
        if not self.rows:
            raise ValueError("no training study belongs to the drawn patients")

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.rows[index]]


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def study_features(encoder: Any, dataset: Any, batch_size: int = 32, desc: str = "embedding") -> dict[str, Any]:
    """Unnormalised study embeddings ``(N, D)`` (eval mode) and the study ids, in dataset order."""
    from tqdm.auto import tqdm

    from rvl.data import collate_studies

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_studies)
    device, was_training = _device(encoder), encoder.training
    encoder.eval()
    out, ids = [], []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            out.append(encoder.encode_study(batch["images"].to(device), batch["view_mask"].to(device),
                                            batch["view_types"].to(device), normalize=False).float().cpu().numpy())
            ids.extend(batch["study_id"])
    finally:
        encoder.train(was_training)
    return {"features": np.concatenate(out).astype(np.float32), "study_id": np.asarray(ids)}


@torch.no_grad()
def predict(classifier: Any, dataset: Any, batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Sigmoid scores ``(N, L)`` and study ids of every study of ``dataset`` (eval mode)."""
    encoder_out = study_features(classifier.encoder, dataset, batch_size, desc="predicting")
    head = classifier.head
    logits = head(torch.from_numpy(encoder_out["features"]).to(head.weight.device)).float()
    return torch.sigmoid(logits).cpu().numpy(), [str(s) for s in encoder_out["study_id"]]


def _targets(values: np.ndarray, settings: FinetuneSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    targets, weights = label_targets(values, settings.uncertain, settings.blank)
    pos_weight = positive_weights(targets, weights) if settings.pos_weight == "auto" else None
    return targets, weights, pos_weight


def train_linear(classifier: Any, features: np.ndarray, values: np.ndarray, settings: FinetuneSettings,
                 seed: int) -> dict[str, Any]:
    """Fit ``classifier.head`` on frozen features ``(N, D)`` with label values ``(N, L)`` (full batch, fixed steps).

    The features are standardised for the optimisation and the scaling is folded back into the head, so the head
    reads the raw embeddings (and CAMs use its weights directly).
    """
    from transformers import get_cosine_schedule_with_warmup

    targets, weights, pos_weight = _targets(values, settings)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = torch.from_numpy((features - mean) / std)
    y, w = torch.from_numpy(targets), torch.from_numpy(weights)
    pw = torch.from_numpy(pos_weight) if pos_weight is not None else None
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.linear_lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, settings.linear_steps)
    loss = torch.tensor(float("nan"))
    for _ in range(settings.linear_steps):
        loss = masked_loss(settings.loss, head(x), y, w, pw)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        scale = torch.from_numpy(1.0 / std)
        weight = head.weight * scale
        classifier.head.weight.copy_(weight)
        classifier.head.bias.copy_(head.bias - weight @ torch.from_numpy(mean))
    return {"final_loss": float(loss.detach()), "steps": settings.linear_steps,
            "pos_weight": None if pw is None else [round(float(v), 3) for v in pw]}


def train_full(classifier: Any, train_set: Any, settings: FinetuneSettings, seed: int, run_dir: Path,
               resume: bool) -> dict[str, Any]:
    """Fine-tune the image side and head of ``classifier`` on ``train_set`` (a :class:`PatientSubset`).

    Checkpoints go to ``run_dir/checkpoints`` every ``save_every`` steps; with ``resume`` the last one is loaded and
    the run continues exactly where it stopped.
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from rvl.data import collate_studies
    from rvl.finetune.augment import StudyCutMix
    from rvl.train_support import (EpochSampler, SeededStudies, TrainState, list_checkpoints, save_checkpoint,
                                   verify_checkpoint)

    use_cpu = settings.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    mixed = settings.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and not use_cpu else "no"
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed)
    world = accelerator.num_processes
    ckpt_dir = run_dir / "checkpoints"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    frame = train_set.dataset.frame.iloc[train_set.rows]
    values = frame[settings.labels].to_numpy(dtype=np.float64, na_value=np.nan)
    _, _, pos_weight = _targets(values, settings)
    batch_size = min(settings.batch_size, len(train_set) // world)
    if batch_size < 1:
        raise ValueError(f"{len(train_set)} training studies for {world} processes: too few to fine-tune")
    seeded = SeededStudies(train_set, seed)
    sampler = EpochSampler(len(seeded), seed)
    loader = DataLoader(seeded, batch_size=batch_size, sampler=sampler, collate_fn=collate_studies, drop_last=True)
    groups = classifier.image_parameter_groups(settings.lr, settings.weight_decay, settings.layer_decay or None,
                                               settings.head_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps * world, settings.max_steps * world)
    model, optimizer, loader, scheduler = accelerator.prepare(classifier, optimizer, loader, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    found = list_checkpoints(ckpt_dir) if resume else []
    if found:
        verify_checkpoint(found[-1], ckpt_dir)  # a damaged checkpoint is refused, naming the file
        accelerator.load_state(str(found[-1]))
        logger.info("resumed %s from %s (step %d)", run_dir.name, found[-1].name, state.step)
    pick = [CHEXPERT_LABELS.index(c) for c in settings.labels]  # batch labels hold the 14 in order
    pw = torch.from_numpy(pos_weight).to(accelerator.device) if pos_weight is not None else None
    cutmix = StudyCutMix(settings.cutmix) if settings.cutmix > 0 else None
    progress = tqdm(total=settings.max_steps, initial=state.step, desc=f"fine-tune {run_dir.name}", leave=False,
                    disable=not accelerator.is_local_main_process)
    per_epoch, last_loss = len(loader), float("nan")
    model.train()
    while state.step < settings.max_steps:
        epoch, skip = divmod(state.micro_step, per_epoch)
        seeded.set_epoch(epoch), sampler.set_epoch(epoch), loader.set_epoch(epoch)
        for batch in (accelerator.skip_first_batches(loader, skip) if skip else loader):
            state.micro_step += 1
            step_seed = (seed * 1_000_003 + state.micro_step) * 1_009 + accelerator.process_index
            targets, weights = label_targets(batch["labels"][:, pick].cpu().numpy(), settings.uncertain,
                                             settings.blank)
            targets = torch.from_numpy(targets).to(accelerator.device)
            weights = torch.from_numpy(weights).to(accelerator.device)
            images = batch["images"]
            if cutmix is not None:
                images, targets, weights, _ = cutmix(images, targets, weights, step_seed)
            torch.manual_seed(step_seed)  # dropout / drop-path
            with accelerator.autocast():
                logits = model(images, batch["view_mask"], batch["view_types"])
            loss = masked_loss(settings.loss, logits, targets, weights, pw)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"{run_dir.name}: non-finite loss at step {state.step}; lower --lr")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            last_loss = float(loss.detach())
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.3f}")
            if state.step % settings.save_every == 0 or state.step == settings.max_steps:
                save_checkpoint(accelerator, ckpt_dir, f"step_{state.step:08d}", keep_last=1)
            if state.step >= settings.max_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    net = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return {"final_loss": last_loss, "steps": state.step, "batch_size": batch_size, "processes": world,
            "mixed_precision": mixed, "pos_weight": None if pw is None else [round(float(v), 3) for v in pw.cpu()],
            "cut_remain_images": int(getattr(train_set.dataset, "cut_count", 0)), "model": net}

