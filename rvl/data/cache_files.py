"""Reading back a prepared cache (written by ``rvl prepare``, :mod:`rvl.data.cache`): its dataset and study rows.

Kept apart from the writer so that the manifest reader can open a cache folder without importing the writer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["load_cache", "read_cache_frame"]


def load_cache(cache_dir: str | os.PathLike):
    """(datasets.Dataset, prepare.json dict) of a prepared cache folder."""
    import datasets

    cache_dir = Path(cache_dir)
    info_path = cache_dir / "prepare.json"
    if not info_path.exists() or not (cache_dir / "dataset").exists():
        raise FileNotFoundError(f"{cache_dir}: not a prepared cache (no prepare.json/dataset; run `rvl prepare`)")
    return datasets.load_from_disk(str(cache_dir / "dataset")), json.loads(info_path.read_text())


def read_cache_frame(cache_dir: str | os.PathLike):
    """The study rows of a prepared cache as a manifest DataFrame (without pixels)."""
    data, _ = load_cache(cache_dir)
    table = data.data.table.drop_columns(["pixels"])
    frame = table.to_pandas()
    for col in ("image_paths", "view_positions"):
        frame[col] = [list(v) for v in frame[col]]
    return frame
