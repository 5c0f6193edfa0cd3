"""Study manifests: read the rvl manifest (CSV / Parquet / JSONL / HF datasets) and convert public CXR layouts to it.

The rvl study manifest has one row per study (see the shared contract): ``patient_id, study_id, study_date, split,
image_paths (list), view_positions (list), report``, the 14 CheXpert label columns (1/0/-1/NaN), ``finding_boxes``
(JSON, aligned with ``image_paths``) and optionally ``findings`` (JSON). ``read_manifest`` returns a pandas DataFrame
with the lists decoded and image paths made absolute.

Converters (each also reachable through ``read_manifest(path, format=...)``): ``read_mimic_cxr_jpg``,
``read_iu_xray``, ``read_chexpert_csv`` (in ``rvl.data.converters``) and ``read_dicom_folder`` (in
``rvl.data.dicom_folder``).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rvl.data import converters
from rvl.data.cache_files import read_cache_frame
from rvl.data.dicom_folder import read_dicom_folder
from rvl.data.schema import (MANIFEST_COLUMNS, MANIFEST_FORMATS, MIMIC_METADATA, SPLIT_ALIASES, ManifestError,
                             assign_splits, compose_report, finalize_manifest)
from rvl.fileio import write_atomic

__all__ = ["MANIFEST_COLUMNS", "MANIFEST_FORMATS", "ManifestError", "read_manifest", "detect_format",
           "finalize_manifest", "assign_splits", "compose_report", "write_manifest"]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------ public entry
def read_manifest(source: str | os.PathLike | Any, format: str = "auto", **kwargs: Any) -> pd.DataFrame:
    """Read a study manifest (or convert a public dataset layout) into the rvl manifest DataFrame.

    Args:
        source: rvl manifest file (.parquet/.csv/.jsonl/.json), an HF ``datasets`` dataset or its ``save_to_disk``
            folder, a prepared cache folder, or a dataset root / file in one of the converter formats.
        format: "auto" | "rvl" | "mimic" | "iu" | "chexpert" | "dicom-folder".
        **kwargs: passed to the converter (e.g. ``reports=`` for "dicom-folder", ``image_root=`` for "chexpert").

    Returns:
        One row per study with ``MANIFEST_COLUMNS``; ``image_paths``/``view_positions`` are lists, paths absolute.
    """
    if format not in MANIFEST_FORMATS:
        raise ManifestError(f"unknown manifest format {format!r}; expected one of {', '.join(MANIFEST_FORMATS)}")
    if not isinstance(source, (str, os.PathLike)):  # an in-memory datasets.Dataset / DatasetDict
        return finalize_manifest(_hf_to_frame(source), base_dir=Path.cwd(), origin="<datasets object>")
    path = Path(source)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "rvl":
        reader = _read_rvl
    elif fmt == "dicom-folder":
        reader = read_dicom_folder
    else:
        reader = {"mimic": converters.read_mimic_cxr_jpg, "iu": converters.read_iu_xray,
                  "chexpert": converters.read_chexpert_csv}[fmt]
    unknown = set(kwargs) - set(inspect.signature(reader).parameters)
    if unknown:
        raise ManifestError(f"{path}: option(s) {sorted(unknown)} do not apply to the {fmt!r} format")
    return reader(path, **kwargs)


def detect_format(path: str | os.PathLike) -> str:
    """Guess the layout of ``path``: "rvl", "mimic", "iu", "chexpert" or "dicom-folder"."""
    path = Path(path)
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if names & {"prepare.json", "dataset_info.json", "state.json", "manifest.parquet", "manifest.csv",
                    "manifest.jsonl", "dataset_dict.json"} or (path / "dataset" / "state.json").is_file():
            return "rvl"
        if MIMIC_METADATA in names or MIMIC_METADATA + ".gz" in names:
            return "mimic"
        if "indiana_reports.csv" in names:
            return "iu"
        if any(_looks_dicom(p) for p in _first_files(path, 50)):
            return "dicom-folder"
        raise ManifestError(f"{path}: cannot tell the dataset layout of this folder (no manifest.parquet/csv, "
                            f"{MIMIC_METADATA}, indiana_reports.csv or DICOM files); pass format=")
    if path.suffix.lower() in (".parquet", ".jsonl", ".json"):
        return "rvl"
    try:
        header = set(pd.read_csv(path, nrows=0).columns)
    except Exception as e:
        raise ManifestError(f"{path}: cannot read as a manifest ({e})") from None
    if "image_paths" in header:
        return "rvl"
    if {"dicom_id", "study_id", "subject_id"} <= header:
        return "mimic"
    if "uid" in header and ({"findings", "impression"} <= header or {"filename", "projection"} <= header):
        return "iu"
    if "Path" in header and ("Frontal/Lateral" in header or "AP/PA" in header):
        return "chexpert"
    raise ManifestError(f"{path}: cannot tell the manifest format from its columns {sorted(header)[:12]}; pass format=")


def write_manifest(frame: pd.DataFrame, out_dir: str | os.PathLike, relative_to: str | os.PathLike | None = None,
                   ) -> tuple[Path, Path]:
    """Write ``manifest.parquet`` and ``manifest.csv`` (lists as JSON in the CSV) atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = frame.copy()
    if relative_to is not None:
        frame["image_paths"] = [[os.path.relpath(p, relative_to) for p in ps] for ps in frame["image_paths"]]
    parquet, csv = out_dir / "manifest.parquet", out_dir / "manifest.csv"
    write_atomic(parquet, lambda tmp: frame.to_parquet(tmp, index=False))
    as_csv = frame.copy()
    for col in as_csv.columns:  # every list column (image_paths, view_positions, dicom_paths...) as JSON
        if any(isinstance(v, (list, tuple, np.ndarray)) for v in as_csv[col]):
            as_csv[col] = [json.dumps(list(v)) if isinstance(v, (list, tuple, np.ndarray)) else v for v in as_csv[col]]
    write_atomic(csv, lambda tmp: as_csv.to_csv(tmp, index=False))
    return parquet, csv


# ------------------------------------------------------------------------------------------------- the rvl manifest
def _read_rvl(path: Path, image_column: str = "image_paths") -> pd.DataFrame:
    """The rvl manifest; ``image_column`` picks another aligned list of files as the images (e.g. the
    ``dicom_paths`` that ``rvl phantoms --format both`` writes next to the PNG ``image_paths``)."""
    if path.is_dir():
        if (path / "prepare.json").exists():
            return read_cache_frame(path)
        if (path / "dataset" / "state.json").is_file():
            raise ManifestError(f"{path / 'prepare.json'}: missing: a prepared cache without its header (deleted, or "
                                "the run was interrupted); run `rvl prepare` again on its manifest")
        for name in ("manifest.parquet", "manifest.jsonl", "manifest.csv"):
            if (path / name).exists():
                return _read_rvl(path / name, image_column)
        import datasets

        frame = _hf_to_frame(datasets.load_from_disk(str(path)))
        return finalize_manifest(_use_images(frame, image_column, path), base_dir=path, origin=str(path))
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        else:
            frame = pd.read_csv(path, dtype={"patient_id": str, "study_id": str, "study_date": str, "split": str},
                                keep_default_na=True)
    except Exception as e:
        raise ManifestError(f"{path}: cannot read manifest ({type(e).__name__}: {e})") from None
    return finalize_manifest(_use_images(frame, image_column, path), base_dir=path.parent, origin=str(path))


def _use_images(frame: pd.DataFrame, image_column: str, origin: Path) -> pd.DataFrame:
    if image_column == "image_paths":
        return frame
    if image_column not in frame:
        raise ManifestError(f"{origin}: no column {image_column!r} to use as images; has {list(frame.columns)[:20]}")
    frame = frame.rename(columns={"image_paths": "original_image_paths"})
    return frame.rename(columns={image_column: "image_paths"})


def _hf_to_frame(data: Any) -> pd.DataFrame:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        parts = []
        for split_name, part in data.items():
            frame = part.remove_columns([c for c in ("pixels",) if c in part.column_names]).to_pandas()
            if "split" not in frame:
                frame["split"] = SPLIT_ALIASES.get(split_name, split_name)
            parts.append(frame)
        return pd.concat(parts, ignore_index=True)
    return data.remove_columns([c for c in ("pixels",) if c in data.column_names]).to_pandas()


def _first_files(root: Path, limit: int) -> list[Path]:
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            found.append(Path(dirpath) / name)
            if len(found) >= limit:
                return found
    return found


def _looks_dicom(path: Path) -> bool:
    from rvl.data.io import is_dicom_file

    return is_dicom_file(path)


