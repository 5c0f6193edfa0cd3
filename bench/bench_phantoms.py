"""Benchmark: `rvl phantoms` studies per second per core at 256 px (one worker), against bare PNG encoding.

    .venv/bin/python bench/bench_phantoms.py [--quick] [--studies N] [--size 256]

Rows (all single-process, measured in this run):
  generate_phantoms     the whole pipeline: anatomy, findings, reports, PNG files, manifest (Parquet + CSV)
  Pillow PNG encode     baseline: only encoding the same images with Pillow (compress_level=1), in memory
  rvl encode_png        only encoding the same images with the phantom writer's PNG encoder, in memory
Studies/s are per core: wall time of a single process (CPU time is shown too, since the machine may be shared).
Target: >= 200 studies/s/core for generate_phantoms at 256 px.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 studies instead of 2000")
    parser.add_argument("--studies", type=int, default=None)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.studies or (300 if args.quick else 2000)

    from PIL import Image

    from rvl.phantoms import generate_phantoms
    from rvl.phantoms.writer import encode_png

    with tempfile.TemporaryDirectory(prefix="bench-phantoms-") as tmp:
        out = Path(tmp) / "phantoms"
        generate_phantoms(Path(tmp) / "warmup", 5, size=args.size, seed=args.seed + 1, progress=False)  # imports
        wall, cpu = _timed(lambda: generate_phantoms(out, n, size=args.size, seed=args.seed, progress=False))
        pngs = sorted(out.glob("images/*/*/*.png"))
        images = [np.asarray(Image.open(p)) for p in pngs]

    def pillow() -> None:
        for img in images:
            Image.fromarray(img).save(io.BytesIO(), format="PNG", compress_level=1)

    def ours() -> None:
        for img in images:
            encode_png(img)

    rows = [("generate_phantoms (full pipeline)", wall, cpu)]
    rows.append(("baseline: Pillow PNG encode only", *_timed(pillow)))
    rows.append(("rvl encode_png only", *_timed(ours)))
    per_study = len(images) / n
    print(f"\nrvl phantoms benchmark: {n} studies, {len(images)} images ({per_study:.2f} per study), "
          f"{args.size} px, 1 process\n")
    print(f"{'step':38s} {'wall s':>8s} {'studies/s':>10s} {'images/s':>9s} {'CPU s':>7s} {'studies/CPU-s':>13s}")
    for name, w, c in rows:
        print(f"{name:38s} {w:8.2f} {n / w:10.0f} {len(images) / w:9.0f} {c:7.2f} {n / max(c, 1e-9):13.0f}")
    gen, base = rows[0], rows[1]
    print(f"\nratio generate_phantoms / Pillow-encode-only throughput: {base[1] / gen[1]:.2f}x "
          f"(>1: generating, drawing, reporting and writing a study is faster than Pillow merely encoding its PNGs)")
    print(f"target >= 200 studies/s/core: {'MET' if n / gen[1] >= 200 else 'NOT MET'} ({n / gen[1]:.0f} wall, "
          f"{n / max(gen[2], 1e-9):.0f} per CPU-second)")


if __name__ == "__main__":
    main()
