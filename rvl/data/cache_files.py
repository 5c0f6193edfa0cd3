"""Reading back a prepared cache (written by ``rvl prepare``, :mod:`rvl.data.cache`): its dataset and study rows.

Kept apart from the writer so that the manifest reader can open a cache folder without importing the writer. Every
file of the cache is checked against the sha256 that ``prepare.json`` recorded when the cache was written, once per
process as the cache is first opened (:func:`verify_cache`): a changed byte anywhere stops the reader with an error
naming the file and the command that repairs it, instead of training on altered pixels.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rvl.integrity import IntegrityError, check_seal, require_intact

__all__ = ["load_cache", "read_cache_frame", "read_prepare_info", "rebuild_command", "verify_cache"]

logger = logging.getLogger(__name__)


def rebuild_command(cache_dir: str | os.PathLike, info: dict[str, Any] | None = None) -> str:
    """The ``rvl prepare --repair`` command line that rebuilds the corrupt parts of a cache."""
    info = info or {}
    manifest = info.get("source_manifest", "MANIFEST")
    fmt = f" --format {info['format']}" if info.get("format", "auto") != "auto" else ""
    return f"rvl prepare {manifest} --out {cache_dir} --size {info.get('size', 'SIZE')}{fmt} --repair"


def read_prepare_info(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """``prepare.json`` of a cache; :class:`IntegrityError` when it is unreadable."""
    path = Path(cache_dir) / "prepare.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(path, f"unreadable cache header ({err})", rebuild=rebuild_command(cache_dir)) from None
    if not isinstance(info, dict):
        raise IntegrityError(path, "not a cache header (expected a JSON object)", rebuild=rebuild_command(cache_dir))
    return info


def verify_cache(cache_dir: str | os.PathLike, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file of a cache against ``prepare.json``'s checksums (hashed once per process); returns the info.

    Raises:
        IntegrityError: a file is missing, truncated or altered, or ``prepare.json`` itself was edited.
    """
    info = read_prepare_info(cache_dir) if info is None else info
    rebuild = rebuild_command(cache_dir, info)
    if "checksums" not in info:
        logger.warning("%s was prepared before rvl recorded checksums: its files cannot be verified (re-run "
                       "`rvl prepare` to add them)", cache_dir)
        return info
    table = check_seal(info["checksums"], Path(cache_dir) / "prepare.json", rebuild)
    require_intact(cache_dir, table, rebuild)
    return info


def load_cache(cache_dir: str | os.PathLike, verify: bool = True):
    """(datasets.Dataset, prepare.json dict) of a prepared cache folder, its files checked (:func:`verify_cache`)."""
    import datasets

    cache_dir = Path(cache_dir)
    info_path = cache_dir / "prepare.json"
    if not info_path.exists() or not (cache_dir / "dataset").exists():
        raise FileNotFoundError(f"{cache_dir}: not a prepared cache (no prepare.json/dataset; run `rvl prepare`)")
    info = verify_cache(cache_dir) if verify else read_prepare_info(cache_dir)
    return datasets.load_from_disk(str(cache_dir / "dataset")), info


def read_cache_frame(cache_dir: str | os.PathLike):
    """The study rows of a prepared cache as a manifest DataFrame (without pixels)."""
    data, _ = load_cache(cache_dir)
    table = data.data.table.drop_columns(["pixels"])
    frame = table.to_pandas()
    for col in ("image_paths", "view_positions"):
        frame[col] = [list(v) for v in frame[col]]
    if "image_sizes" in frame:  # caches since version 2: each kept view's original [height, width]
        frame["image_sizes"] = [[(int(h), int(w)) for h, w in v] for v in frame["image_sizes"]]
    return frame
