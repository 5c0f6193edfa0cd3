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

import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from rvl.constants import CHEXPERT_LABELS, normalize_view

__all__ = ["MANIFEST_COLUMNS", "MANIFEST_FORMATS", "ManifestError", "read_manifest", "detect_format",
           "finalize_manifest", "assign_splits", "compose_report", "write_manifest"]

logger = logging.getLogger(__name__)

BASE_COLUMNS = ["patient_id", "study_id", "study_date", "split", "image_paths", "view_positions", "report"]
MANIFEST_COLUMNS = [*BASE_COLUMNS, *CHEXPERT_LABELS, "finding_boxes", "findings"]
MANIFEST_FORMATS = ("auto", "rvl", "mimic", "iu", "chexpert", "dicom-folder")
SPLITS = ("train", "validate", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "validate", "val": "validate",
                  "validate": "validate", "validation": "validate", "dev": "validate", "test": "test"}
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"


class ManifestError(ValueError):
    """A manifest (or a source layout being converted) is malformed; the message names the file and row."""


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
        from rvl.data.dicom_folder import read_dicom_folder as reader
    else:
        from rvl.data import converters

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
                    "manifest.jsonl", "dataset_dict.json"}:
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
    tmp = parquet.with_name(f".{parquet.name}.tmp-{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, parquet)
    as_csv = frame.copy()
    for col in as_csv.columns:  # every list column (image_paths, view_positions, dicom_paths...) as JSON
        if any(isinstance(v, (list, tuple, np.ndarray)) for v in as_csv[col]):
            as_csv[col] = [json.dumps(list(v)) if isinstance(v, (list, tuple, np.ndarray)) else v for v in as_csv[col]]
    tmp = csv.with_name(f".{csv.name}.tmp-{os.getpid()}")
    as_csv.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    return parquet, csv


# ------------------------------------------------------------------------------------------------- the rvl manifest
def _read_rvl(path: Path, image_column: str = "image_paths") -> pd.DataFrame:
    """The rvl manifest; ``image_column`` picks another aligned list of files as the images (e.g. the
    ``dicom_paths`` that ``rvl phantoms --format both`` writes next to the PNG ``image_paths``)."""
    if path.is_dir():
        if (path / "prepare.json").exists():
            from rvl.data.cache import read_cache_frame

            return read_cache_frame(path)
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
                frame["split"] = _SPLIT_ALIASES.get(split_name, split_name)
            parts.append(frame)
        return pd.concat(parts, ignore_index=True)
    return data.remove_columns([c for c in ("pixels",) if c in data.column_names]).to_pandas()


def _as_list(value: Any, column: str, origin: str, row: int) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value] if column == "image_paths" and value else None
    elif isinstance(value, (np.ndarray, tuple)):
        value = list(value)
    if not isinstance(value, list):
        raise ManifestError(f"{origin}: row {row}: column {column!r} must be a list (or JSON list), got {value!r}")
    return [str(v) for v in value]


def finalize_manifest(frame: pd.DataFrame, base_dir: str | os.PathLike, origin: str) -> pd.DataFrame:
    """Validate a manifest frame and bring it to the exact schema (decoded lists, absolute paths, all columns).

    Missing optional columns are filled: ``study_date``/``report`` empty, labels NaN, ``finding_boxes`` empty lists
    per image, ``findings`` "[]", ``split`` assigned by patient (stable hash).
    """
    missing = [c for c in ("patient_id", "study_id", "image_paths") if c not in frame.columns]
    if missing:
        raise ManifestError(f"{origin}: missing required column(s) {missing}; has {list(frame.columns)[:20]}")
    frame = frame.reset_index(drop=True).copy()
    base_dir = Path(base_dir)
    image_paths, views = [], []
    for i, (paths, row_views) in enumerate(zip(frame["image_paths"], frame.get("view_positions",
                                                                                [None] * len(frame)))):
        paths = _as_list(paths, "image_paths", origin, i)
        if not paths:
            raise ManifestError(f"{origin}: row {i} (study {frame['study_id'].iloc[i]}): no images")
        row_views = ["OTHER"] * len(paths) if row_views is None else _as_list(row_views, "view_positions", origin, i)
        if len(row_views) != len(paths):
            raise ManifestError(f"{origin}: row {i} (study {frame['study_id'].iloc[i]}): {len(paths)} image_paths "
                                f"but {len(row_views)} view_positions")
        image_paths.append([p if os.path.isabs(p) else os.path.normpath(base_dir / p) for p in paths])
        views.append([normalize_view(v) for v in row_views])
    frame["image_paths"], frame["view_positions"] = image_paths, views
    for col in [c for c in frame.columns if c.endswith("_paths") and c != "image_paths"]:  # e.g. dicom_paths
        frame[col] = [[p if os.path.isabs(p) else os.path.normpath(base_dir / p)
                       for p in _as_list(v, col, origin, i)] if not _is_missing(v) else None
                      for i, v in enumerate(frame[col])]
    for col in ("patient_id", "study_id"):
        if frame[col].isna().any():
            raise ManifestError(f"{origin}: row {int(frame[col].isna().idxmax())}: empty {col}")
        frame[col] = frame[col].astype(str)
    duplicated = frame["study_id"].duplicated()
    if duplicated.any():
        raise ManifestError(f"{origin}: duplicate study_id {frame['study_id'][duplicated].iloc[0]!r}")
    frame["study_date"] = [_iso_date(d) for d in frame.get("study_date", [""] * len(frame))]
    frame["report"] = frame.get("report", pd.Series([""] * len(frame))).fillna("").astype(str)
    by_patient = assign_splits(frame["patient_id"])  # for rows without a split
    given = frame["split"] if "split" in frame else pd.Series([None] * len(frame))
    frame["split"] = [_SPLIT_ALIASES.get(str(s).strip().lower(), str(s).strip()) if isinstance(s, str) and s.strip()
                      else default for s, default in zip(given, by_patient)]
    for label in CHEXPERT_LABELS:
        frame[label] = pd.to_numeric(frame[label], errors="coerce").astype(np.float64) if label in frame \
            else np.nan
    if "finding_boxes" not in frame:
        frame["finding_boxes"] = [json.dumps([[] for _ in ps]) for ps in image_paths]
    else:
        frame["finding_boxes"] = [v if isinstance(v, str) else json.dumps(v if v is not None else [[] for _ in ps])
                                  for v, ps in zip(frame["finding_boxes"], image_paths)]
    if "findings" not in frame:
        frame["findings"] = "[]"
    else:
        frame["findings"] = [v if isinstance(v, str) else json.dumps(v if v is not None else [])
                             for v in frame["findings"]]
    extra = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    return frame[MANIFEST_COLUMNS + extra]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _iso_date(value: Any) -> str:
    """'YYYY-MM-DD' from YYYYMMDD ints/strings (DICOM, MIMIC) or ISO strings; '' when unknown."""
    if _is_missing(value):
        return ""
    text = str(value).strip()
    if text.endswith(".0"):
        text = text[:-2]
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text[:10]


def assign_splits(patient_ids: Iterable[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> list[str]:
    """Split by patient with a stable hash, so a patient's studies share a split and re-runs agree."""
    bounds = np.cumsum(fractions) / float(sum(fractions))
    out = []
    for pid in patient_ids:
        digest = hashlib.sha1(f"{seed}:{pid}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        out.append(SPLITS[min(int(np.searchsorted(bounds, u, side="right")), len(SPLITS) - 1)])
    return out


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


def _labels_from(row: pd.Series | dict) -> dict[str, float]:
    return {label: float(row[label]) if label in row and pd.notna(row[label]) else np.nan
            for label in CHEXPERT_LABELS}


def compose_report(sections: dict[str, Any]) -> str:
    """Join named report sections as 'INDICATION: ...' paragraphs, skipping empty ones."""
    parts = []
    for name, text in sections.items():
        if isinstance(text, str) and text.strip():
            parts.append(f"{name.upper()}: {text.strip()}")
    return "\n\n".join(parts)
