"""Images/s per core: StudyDataset items from the prepared cache vs decoding the original files (PNG and DICOM).

Originals are full-size chest films derived from the real CR PA chest radiograph shipped in pydicom-data
(RG1_UNCR.dcm, 1955 x 1841, 15-bit; each copy shifted, re-exposed and with fresh noise so no two files are the same),
written as 8-bit PNG and as 16-bit MONOCHROME1 DICOM - the sizes a MIMIC/CheXpert/PACS pipeline decodes. When
``rvl.phantoms`` is installed its PNG and DICOM phantoms are measured too. Single process, one torch thread.

    .venv/bin/python bench/bench_cache.py [--quick] [--images N] [--sizes 256 512]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rvl.data import StudyDataset, prepare, read_image  # noqa: E402
from rvl.data.manifest import write_manifest  # noqa: E402

TARGET_CACHE_IMAGES_PER_S = 600


def write_chest_films(out: Path, n_images: int, seed: int = 0) -> tuple[Path, Path]:
    """PNG and DICOM manifests of ``n_images`` (2 views per study) variants of the real RG1 chest film."""
    import pydicom
    from pydicom.data import get_testdata_file

    film_path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if film_path is None:
        raise SystemExit("needs pydicom-data: pip install 'rvl-cxr[dicom]'")
    film = read_image(film_path)
    template = pydicom.dcmread(film_path)
    rng = np.random.default_rng(seed)
    rows_png, rows_dcm = [], []
    for study in range((n_images + 1) // 2):
        paths_png, paths_dcm = [], []
        for view in range(2):
            shifted = np.roll(film, rng.integers(-40, 40, size=2), axis=(0, 1))
            variant = np.clip(shifted * rng.uniform(0.9, 1.1) + rng.normal(0, 0.01, film.shape), 0, 1)
            name = f"s{study:04d}_v{view}"
            Image.fromarray(np.rint(variant * 255).astype(np.uint8)).save(out / f"{name}.png")
            template.PixelData = np.rint((1.0 - variant) * 30000).astype(np.uint16).tobytes()  # MONOCHROME1
            template.save_as(out / f"{name}.dcm")
            paths_png.append(f"{name}.png")
            paths_dcm.append(f"{name}.dcm")
        base = {"patient_id": f"p{study}", "study_id": f"s{study}", "split": "train",
                "view_positions": ["PA", "LATERAL"], "report": "FINDINGS: Clear lungs."}
        rows_png.append({**base, "image_paths": paths_png})
        rows_dcm.append({**base, "image_paths": paths_dcm})
    for sub, rows in (("png", rows_png), ("dcm", rows_dcm)):  # one manifest per format, in sub-folders
        frame = pd.DataFrame(rows)
        frame["image_paths"] = [[f"../{p}" for p in ps] for ps in frame["image_paths"]]
        write_manifest(frame, out / sub)
    return out / "png" / "manifest.parquet", out / "dcm" / "manifest.parquet"


def images_per_second(dataset: StudyDataset, min_seconds: float) -> tuple[float, int]:
    """Read every item (repeatedly, until ``min_seconds``); returns (real views served per second, views)."""
    served, start, rounds = 0, time.perf_counter(), 0
    while True:
        for i in range(len(dataset)):
            served += int(dataset[i]["view_mask"].sum())
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return served / elapsed, served


def phantom_sources(out: Path, n_studies: int, size: int) -> list[tuple[str, Path, dict]]:
    """(label, manifest, read_manifest options) of `rvl phantoms --format both` originals, when rvl.phantoms exists."""
    try:
        from rvl.phantoms import generate_phantoms
    except ImportError:
        return []
    manifest = generate_phantoms(out / "phantoms", n_studies, size, 0, "both", progress=False)
    return [(f"phantom PNG {size}px", manifest, {}),
            (f"phantom DICOM {size}px", manifest, {"image_column": "dicom_paths"})]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, short timings")
    parser.add_argument("--images", type=int, default=None, help="original chest films to write (default 40, quick 8)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--phantom-size", type=int, default=1024, help="side of the phantom originals")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    n_images = args.images or (8 if args.quick else 40)
    min_seconds = 0.5 if args.quick else 2.0
    with tempfile.TemporaryDirectory(prefix="rvl-bench-cache-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        png_manifest, dcm_manifest = write_chest_films(tmp, n_images)
        sources = [("chest film PNG 1955x1841 8-bit", png_manifest, {}),
                   ("chest film DICOM 1955x1841 15-bit", dcm_manifest, {})]
        sources += phantom_sources(tmp, max(2, n_images // 2), args.phantom_size)
        print(f"wrote originals in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}, "
              f"{n_images} chest films per format", file=sys.stderr)
        rows = []
        for size in args.sizes:
            cache = tmp / f"cache_{size}"
            t0 = time.perf_counter()
            info = prepare(png_manifest, cache, size=size, workers=1, progress=False)
            prepare_rate = info["n_images"] / (time.perf_counter() - t0)
            cache_rate, _ = images_per_second(StudyDataset(cache, train=False), min_seconds)
            rows.append({"size": size, "read from": f"prepared cache ({size}px)", "images/s": cache_rate,
                         "cache speed-up": 1.0})
            for label, manifest, options in sources:
                rate, _ = images_per_second(StudyDataset(manifest, train=False, size=size, **options), min_seconds)
                rows.append({"size": size, "read from": f"decode {label}", "images/s": rate,
                             "cache speed-up": cache_rate / rate})
            rows.append({"size": size, "read from": "(rvl prepare, 1 worker, PNG films)", "images/s": prepare_rate,
                         "cache speed-up": float("nan")})
    table = pd.DataFrame(rows)
    table["cache speed-up"] = [f"{v:,.1f}x" if v == v else "" for v in table["cache speed-up"]]
    print(table.to_string(index=False, formatters={"images/s": "{:,.1f}".format}))
    at_256 = table[(table["size"] == 256) & (table["read from"].str.startswith("prepared"))]["images/s"]
    if len(at_256):
        verdict = "PASS" if at_256.iloc[0] >= TARGET_CACHE_IMAGES_PER_S else "MISS"
        print(f"target >= {TARGET_CACHE_IMAGES_PER_S} images/s per core from the cache at 256 px: "
              f"{at_256.iloc[0]:,.0f} ({verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
