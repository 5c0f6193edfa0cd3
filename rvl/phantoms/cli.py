"""``rvl phantoms``: generate synthetic chest-radiograph studies with reports and ground truth."""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (images/, manifest.parquet, manifest.csv)")
    parser.add_argument("--studies", type=int, required=True, help="number of studies to generate")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; output is a deterministic function of it")
    parser.add_argument("--format", choices=["png", "dicom", "both"], default="png", help="image file format")
    parser.add_argument("--monochrome1-fraction", type=float, default=0.0,
                        help="fraction of DICOM images stored as MONOCHROME1 (inverted grey scale)")
    parser.add_argument("--preview", action="store_true", help="also write OUT/preview.png, a contact sheet")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    if args.studies < 1:
        print(f"rvl phantoms: --studies must be >= 1, got {args.studies}", file=sys.stderr)
        return 2
    if args.size < 32:
        print(f"rvl phantoms: --size must be >= 32, got {args.size}", file=sys.stderr)
        return 2
    if not 0.0 <= args.monochrome1_fraction <= 1.0:
        print(f"rvl phantoms: --monochrome1-fraction must be in [0, 1], got {args.monochrome1_fraction}",
              file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"rvl phantoms: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    from rvl.phantoms import generate_phantoms

    start = time.perf_counter()
    manifest = generate_phantoms(args.out, args.studies, size=args.size, seed=args.seed, fmt=args.format,
                                 preview=args.preview, monochrome1_fraction=args.monochrome1_fraction,
                                 workers=args.workers, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.studies} studies in {elapsed:.1f} s ({args.studies / elapsed:.0f} studies/s): {manifest}")
    if args.preview:
        print(f"preview: {manifest.parent / 'preview.png'}")
    return 0
