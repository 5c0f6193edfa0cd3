"""Zero-shot throughput vs the bare image-tower forward (the roofline of any zero-shot pipeline).

    .venv/bin/python bench/bench_zeroshot.py             # rvl-small, 256 images, batch 32
    .venv/bin/python bench/bench_zeroshot.py --quick     # rvl-tiny, 64 images
    .venv/bin/python bench/bench_zeroshot.py --model-dir MODEL_DIR --device cuda

Baseline: ``model.clip.visual(images)`` (open_clip's image tower, nothing else). Measured in the same run:
``ZeroShotClassifier.predict_proba(model.encode_image(images))`` (14 CheXpert labels: embedding + pos/neg scoring),
and study-level zero-shot, ``encode_study`` on 2-view studies + scoring vs two bare tower passes per study.
Target (issue 5): >= 0.9x the baseline. Timings interleave the variants and keep the best (least disturbed) of the
repeats: the machines these run on are shared.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="packaged config (default rvl-small; rvl-tiny with --quick)")
    parser.add_argument("--model-dir", default=None, help="a saved model folder instead of a fresh config")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from rvl.model import create_model, from_pretrained
    from rvl.zeroshot import ZeroShotClassifier

    name = args.model or ("rvl-tiny" if args.quick else "rvl-small")
    model = (from_pretrained(args.model_dir) if args.model_dir else create_model(name)).eval().to(args.device)
    n_images = args.images or (64 if args.quick else 256)
    classifier = ZeroShotClassifier.from_model(model)
    size, bs = model.image_size, args.batch_size
    images = torch.randn(n_images, 3, size, size, device=args.device)
    studies = images.reshape(n_images // 2, 2, 3, size, size)
    view_mask = torch.ones(n_images // 2, 2, dtype=torch.bool, device=args.device)
    view_types = torch.tensor([[0, 2]], device=args.device).expand(n_images // 2, 2)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare() -> None:
        for i in range(0, n_images, bs):
            model.clip.visual(images[i:i + bs])

    def zero_shot_images() -> None:
        for i in range(0, n_images, bs):
            classifier.predict_proba(model.encode_image(images[i:i + bs]).float().cpu().numpy())

    def zero_shot_studies() -> None:
        for i in range(0, n_images // 2, bs // 2):
            emb = model.encode_study(studies[i:i + bs // 2], view_mask[i:i + bs // 2], view_types[i:i + bs // 2])
            classifier.predict_proba(emb.float().cpu().numpy())

    variants = {"bare image tower (baseline)": bare, "zero-shot, per image": zero_shot_images,
                "zero-shot, 2-view studies (fused)": zero_shot_studies}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for key, fn in variants.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.clip.visual.parameters()) / 1e6
    print(f"# {args.model_dir or name}: image tower {params:.1f} M params, {size}px, {n_images} images, batch {bs}, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = min(times["bare image tower (baseline)"])
    print(f"| {'variant':<36} | images/s | x baseline |")
    print(f"|{'-' * 38}|----------|------------|")
    for key, values in times.items():
        best = min(values)
        print(f"| {key:<36} | {n_images / best:8.1f} | {base / best:10.2f} |")


if __name__ == "__main__":
    main()
