"""The rvl study manifest's schema: its columns, validation into the exact schema, and small helpers shared by the
readers (``rvl.data.manifest``) and the dataset converters (``rvl.data.converters``, ``rvl.data.dicom_folder``).

This module imports no other ``rvl.data`` module, so the readers and converters can all import it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from rvl.constants import CHEXPERT_LABELS, normalize_view

__all__ = ["BASE_COLUMNS", "MANIFEST_COLUMNS", "MANIFEST_FORMATS", "SPLITS", "SPLIT_ALIASES", "MIMIC_METADATA",
           "ManifestError", "finalize_manifest", "assign_splits", "labels_from", "compose_report"]

BASE_COLUMNS = ["patient_id", "study_id", "study_date", "split", "image_paths", "view_positions", "report"]
MANIFEST_COLUMNS = [*BASE_COLUMNS, *CHEXPERT_LABELS, "finding_boxes", "findings"]
MANIFEST_FORMATS = ("auto", "rvl", "mimic", "iu", "chexpert", "dicom-folder")
SPLITS = ("train", "validate", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "validate", "val": "validate",
                  "validate": "validate", "validation": "validate", "dev": "validate", "test": "test"}
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
SCALAR_COLUMNS = ["patient_id", "study_id", "study_date", "split", "report", *CHEXPERT_LABELS]


class ManifestError(ValueError):
    """A manifest (or a source layout being converted) is malformed; the message names the file and row."""


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
    if len(frame) == 0:  # a header and nothing else: every later step would fail with a less helpful message
        raise ManifestError(f"{origin}: the manifest has no studies (only a header?)")
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
        image_paths.append([_under_root(p, base_dir, origin, i, frame["study_id"].iloc[i]) for p in paths])
        views.append([normalize_view(v) for v in row_views])
    frame["image_paths"], frame["view_positions"] = image_paths, views
    for col in [c for c in frame.columns if c.endswith("_paths") and c != "image_paths"]:  # e.g. dicom_paths
        frame[col] = [[p if os.path.isabs(p) else os.path.abspath(base_dir / p)
                       for p in _as_list(v, col, origin, i)] if not _is_missing(v) else None
                      for i, v in enumerate(frame[col])]
    for col in [c for c in SCALAR_COLUMNS if c in frame.columns]:
        bad = [i for i, v in enumerate(frame[col]) if isinstance(v, (list, tuple, dict, np.ndarray))]
        if bad:
            raise ManifestError(f"{origin}: row {bad[0]} (study {frame['study_id'].iloc[bad[0]]}): column {col!r} "
                                f"holds a {type(frame[col].iloc[bad[0]]).__name__}, expected one value per study "
                                f"({len(bad)} row(s) like this)")
    for col in ("patient_id", "study_id"):
        if frame[col].isna().any():
            raise ManifestError(f"{origin}: row {int(frame[col].isna().idxmax())}: empty {col}")
        frame[col] = frame[col].astype(str)
    duplicated = frame["study_id"].duplicated(keep=False)
    if duplicated.any():
        study = frame["study_id"][duplicated].iloc[0]
        rows = [int(i) for i in np.flatnonzero((frame["study_id"] == study).to_numpy())]
        raise ManifestError(f"{origin}: duplicate study_id {study!r} in rows {rows} ({int(duplicated.sum())} rows "
                            "share a study_id with another); one row per study")
    frame["study_date"] = [_iso_date(d) for d in frame.get("study_date", [""] * len(frame))]
    frame["report"] = frame.get("report", pd.Series([""] * len(frame))).fillna("").astype(str)
    by_patient = assign_splits(frame["patient_id"])  # for rows without a split
    given = frame["split"] if "split" in frame else pd.Series([None] * len(frame))
    frame["split"] = [SPLIT_ALIASES.get(str(s).strip().lower(), str(s).strip()) if isinstance(s, str) and s.strip()
                      else default for s, default in zip(given, by_patient)]
    for label in CHEXPERT_LABELS:
        frame[label] = _label_values(frame[label], label, origin, frame["study_id"]) if label in frame else np.nan
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


def _under_root(path: str, base_dir: Path, origin: str, row: int, study: Any) -> str:
    """Absolute form of a manifest image path (relative ones are relative to the manifest's folder).

    A relative path that climbs out of that folder to a file that does not exist is refused here: it is the mark of a
    manifest moved away from its images (every path would fail later, one by one) or of a typo. One that exists is
    kept (a manifest written next to, not above, its images).
    """
    if os.path.isabs(path):
        return path
    full = os.path.normpath(base_dir / path)
    if os.path.relpath(full, os.path.normpath(base_dir)).split(os.sep)[0] == ".." and not os.path.exists(full):
        raise ManifestError(f"{origin}: row {row} (study {study}): image path {path!r} points outside the manifest "
                            f"folder {base_dir} to a file that does not exist ({full}); image paths are relative to "
                            "the manifest's folder, or absolute")
    return os.path.abspath(full)  # absolute even when the manifest was named by a relative path


def _label_values(values: pd.Series, label: str, origin: str, studies: pd.Series) -> pd.Series:
    """A label column as float64 in {1, 0, -1, NaN}; anything else (text, 2, 0.5, inf) is refused with its row."""
    blank = values.isna() | values.map(lambda v: isinstance(v, str) and v.strip().lower() in ("", "nan", "none"))
    numbers = pd.to_numeric(values.where(~blank), errors="coerce").astype(np.float64)
    bad = ~blank & ~numbers.isin([1.0, 0.0, -1.0])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ManifestError(f"{origin}: row {row} (study {studies.iloc[row]}): label {label!r} is "
                            f"{values.iloc[row]!r}; expected 1, 0, -1 or blank ({int(bad.sum())} row(s) like this)")
    return numbers


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


def labels_from(row: pd.Series | dict) -> dict[str, float]:
    return {label: float(row[label]) if label in row and pd.notna(row[label]) else np.nan
            for label in CHEXPERT_LABELS}


def compose_report(sections: dict[str, Any]) -> str:
    """Join named report sections as 'INDICATION: ...' paragraphs, skipping empty ones."""
    parts = []
    for name, text in sections.items():
        if isinstance(text, str) and text.strip():
            parts.append(f"{name.upper()}: {text.strip()}")
    return "\n\n".join(parts)
