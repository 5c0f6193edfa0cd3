"""Trainer throughput vs the bare tower step, on the same batches.

CPU (always): for rvl-tiny and rvl-small, ``rvl.train.train`` on a phantom set (data loading, study fusion, caption
decoder, label-aware loss, Accelerate, clipping, scheduler: everything) vs the bare open_clip towers doing
forward + ClipLoss + backward + AdamW on the same batches held in memory. Reported as pairs/s and a ratio.

GPU (only when CUDA is available): rvl-base, batch 256, bf16, eager and ``torch.compile``: the rvl step vs (a) the bare
tower step and (b) open_clip's own ViT-B-16 CLIP step, plus MFU from ``torch.utils.flop_counter`` FLOPs.

    .venv/bin/python bench/train_throughput.py [--quick] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def bare_step_fn(model, lr: float = 1e-4):
    """Bare towers: encode every real view + the report, open_clip ClipLoss, backward, AdamW."""
    from open_clip import ClipLoss

    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.clip.parameters(), lr=lr)

    def step(batch):
        images = batch["images"][batch["view_mask"]]
        image_feats = model.clip.encode_image(images, normalize=True)
        # one image per pair for the loss: the first view of each study (the towers still see every view)
        first = batch["view_mask"].long().cumsum(1).eq(1) & batch["view_mask"]
        loss = loss_fn(image_feats[first[batch["view_mask"]]], model.clip.encode_text(batch["text"], normalize=True),
                       model.clip.logit_scale.exp())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, batches, warmup: int = 2) -> float:
    for b in batches[:warmup]:
        step(b)
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return time.perf_counter() - start


def cpu_bench(name: str, size: int, batch_size: int, steps: int, work: Path) -> dict:
    from rvl.config import load_config
    from rvl.data import StudyDataset, collate_studies
    from rvl.model.factory import create_model
    from rvl.phantoms import generate_phantoms
    from rvl.train import train

    data = work / f"ph-{size}"
    if not (data / "manifest.parquet").exists():
        generate_phantoms(data, max(6 * batch_size, 64), size=size, seed=0, fmt="png", progress=False)
    out = work / f"run-{name}"
    cfg = load_config(overrides={"data.source": str(data / "manifest.parquet"), "train.output_dir": str(out),
                                 "model.name": name, "optim.max_steps": steps, "optim.batch_size": batch_size,
                                 "optim.warmup_steps": 1, "train.save_every": 10 ** 9, "train.eval_every": 10 ** 9,
                                 "train.log_with": "none", "train.cpu": True})
    train(cfg)
    trainer = json.loads((out / "train_summary.json").read_text())["pairs_per_s"]

    model = create_model(name, text_dir=out / "tokenizer")
    ds = StudyDataset(data / "manifest.parquet", split="train", train=True, image_transform=model.preprocess_train)
    batches = []
    for i in range(steps):
        items = [ds[(i * batch_size + j) % len(ds)] for j in range(batch_size)]
        batch = collate_studies(items)
        batch["text"] = model.tokenize_reports(batch["report"])
        batches.append(batch)
    seconds = time_steps(bare_step_fn(model), batches)
    bare = (len(batches) - 2) * batch_size / seconds
    return {"model": name, "batch": batch_size, "trainer_pairs_s": trainer, "bare_pairs_s": bare,
            "ratio": trainer / bare}


def gpu_bench(batch_size: int, steps: int) -> list[dict]:
    """rvl-base on one GPU, bf16: rvl step vs bare towers vs open_clip ViT-B-16, eager and compiled, with MFU."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    from rvl.model.factory import create_model
    from rvl.model.loss import RVLLoss

    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 989.0) * 1e12
    model = create_model("rvl-base").to(device)
    ctx = model.tokenizer.context_length
    vocab = len(model.tokenizer.tokenizer)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch_size, 2, 3, 224, 224, device=device, generator=g)
    mask = torch.ones(batch_size, 2, dtype=torch.bool, device=device)
    types = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
    text = torch.randint(5, vocab, (batch_size, ctx), device=device, generator=g)
    labels = torch.randint(0, 2, (batch_size, 14), device=device, generator=g).float()
    loss_fn = RVLLoss(1.0, 0.3, 0.2, pad_id=model.pad_id)
    oc = open_clip.create_model("ViT-B-16").to(device)
    oc_tok = torch.randint(1, 49000, (batch_size, 77), device=device, generator=g)
    clip_loss = open_clip.ClipLoss()

    def make_loss(kind: str):
        def rvl_loss():
            return loss_fn(model(images, mask, types, text), labels)["total"]

        def bare_loss():  # both views through the image tower, first view in the loss
            feats = model.clip.encode_image(images.flatten(0, 1), normalize=True).view(batch_size, 2, -1)[:, 0]
            return clip_loss(feats, model.clip.encode_text(text, normalize=True), model.clip.logit_scale.exp())

        def open_clip_loss():
            feats = oc.encode_image(images.flatten(0, 1), normalize=True).view(batch_size, 2, -1)[:, 0]
            return clip_loss(feats, oc.encode_text(oc_tok, normalize=True), oc.logit_scale.exp())
        return {"rvl": rvl_loss, "bare": bare_loss, "open_clip": open_clip_loss}[kind]

    def make_step(kind: str, compiled: bool):
        params = (oc if kind == "open_clip" else model if kind == "rvl" else model.clip).parameters()
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        compute = torch.compile(make_loss(kind)) if compiled else make_loss(kind)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compute()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    flops = {}
    rows = []
    for compiled in (False, True):
        for kind in ("rvl", "bare", "open_clip"):
            step = make_step(kind, compiled)
            for _ in range(3):
                step()
            if not compiled:  # FLOPs counted once, in eager mode (the compiled graph does the same math)
                with FlopCounterMode(display=False) as counter:
                    step()
                flops[kind] = counter.get_total_flops()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / steps
            rows.append({"card": name, "step": kind, "compiled": compiled, "pairs_s": batch_size / seconds,
                         "mfu": flops[kind] / seconds / peak})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny only, few steps")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cases = [("rvl-tiny", 64, 32)] + ([] if args.quick else [("rvl-small", 128, 32), ("rvl-demo", 128, 32)])
    steps = args.steps or (8 if args.quick else 20)
    with tempfile.TemporaryDirectory(prefix="rvl-bench-") as tmp:
        rows = [cpu_bench(name, size, batch, steps, Path(tmp)) for name, size, batch in cases]
    print(f"\nCPU ({torch.get_num_threads()} threads), {steps} steps; trainer = rvl pretrain loop incl. data loading")
    print(f"{'model':<10} {'batch':>5} {'trainer pairs/s':>16} {'bare pairs/s':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<10} {r['batch']:>5} {r['trainer_pairs_s']:>16.1f} {r['bare_pairs_s']:>13.1f} "
              f"{r['ratio']:>6.2f}")
    if torch.cuda.is_available():
        gpu = gpu_bench(256, args.steps or 20)
        print(f"\nGPU {gpu[0]['card']}, rvl-base batch 256 bf16")
        print(f"{'step':<10} {'compiled':>8} {'pairs/s':>9} {'MFU':>6} {'vs bare':>8}")
        for r in gpu:
            bare = next(x for x in gpu if x["step"] == "bare" and x["compiled"] == r["compiled"])
            print(f"{r['step']:<10} {str(r['compiled']):>8} {r['pairs_s']:>9.0f} {r['mfu']:>6.1%} "
                  f"{r['pairs_s'] / bare['pairs_s']:>8.2f}")
    else:
        print("\nGPU section skipped: no CUDA device")


if __name__ == "__main__":
    main()
