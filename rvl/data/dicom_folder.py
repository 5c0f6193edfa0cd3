"""Convert a folder of DICOM files (a PACS export) into the rvl study manifest.

Files are grouped into studies by their tags (PatientID, StudyInstanceUID, StudyDate, ViewPosition) and joined with
an optional reports CSV keyed by study instance UID or accession number.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rvl.constants import CHEXPERT_LABELS, normalize_view
from rvl.data.schema import ManifestError, finalize_manifest

__all__ = ["read_dicom_folder"]

logger = logging.getLogger(__name__)

_HEADER_TAGS = ["PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate", "ViewPosition", "ViewCodeSequence",
                "SeriesNumber", "InstanceNumber", "Modality", "SOPClassUID"]
_STUDY_UID_COLUMNS = ("study_instance_uid", "StudyInstanceUID", "study_uid", "StudyUID")
_ACCESSION_COLUMNS = ("accession_number", "AccessionNumber", "accession", "Accession")
_REPORT_COLUMNS = ("report", "Report", "report_text", "text", "ReportText")


def _view_of(ds) -> str:
    view = normalize_view(ds.get("ViewPosition"))
    if view != "OTHER":
        return view
    # Some modalities leave ViewPosition empty and code the view in ViewCodeSequence (SNOMED "postero-anterior"...)
    seq = ds.get("ViewCodeSequence")
    meaning = str(seq[0].get("CodeMeaning", "")).lower() if seq else ""
    if "postero" in meaning:
        return "PA"
    if "antero" in meaning:
        return "AP"
    if "left lateral" in meaning:
        return "LL"
    if "lateral" in meaning:
        return "LATERAL"
    return "OTHER"


def read_dicom_folder(root: str | os.PathLike, reports: str | os.PathLike | None = None,
                      report_key: str = "auto", progress: bool = False) -> pd.DataFrame:
    """Scan ``root`` recursively for DICOM images and build one manifest row per StudyInstanceUID.

    Args:
        root: folder of DICOM files (any nesting; files without pixel data such as DICOMDIR/SR are skipped).
        reports: optional CSV with a report text column (``report``/``text``) and a key column: study instance UID
            (``study_instance_uid``/``StudyInstanceUID``) or accession number (``accession_number``/
            ``AccessionNumber``). CheXpert label columns and ``split`` in it are used when present.
        report_key: "auto", "study_uid" or "accession".
        progress: show a tqdm bar while reading headers.
    """
    import pydicom
    from tqdm.auto import tqdm

    root = Path(root).absolute()  # image paths are stored absolute, whatever the caller's working directory
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder of DICOM files")
    files = sorted(Path(d) / f for d, _, names in os.walk(root) for f in names)
    records, n_not_dicom, n_no_pixels = [], 0, 0
    for path in tqdm(files, desc="reading DICOM headers", unit="file", disable=not progress):
        try:
            # defer_size: the pixel data is skipped over, not loaded; we only need to know it is there
            ds = pydicom.dcmread(path, defer_size=1024, specific_tags=_HEADER_TAGS + ["PixelData"])
        except Exception:  # not DICOM (README, thumbnails) or unreadable header: not part of any study
            n_not_dicom += 1
            continue
        if "StudyInstanceUID" not in ds or "PixelData" not in ds:
            n_no_pixels += 1
            continue
        records.append({"path": str(path), "patient_id": str(ds.get("PatientID", "") or ""),
                        "study_uid": str(ds.StudyInstanceUID), "accession": str(ds.get("AccessionNumber", "") or ""),
                        "study_date": str(ds.get("StudyDate", "") or ""), "view": _view_of(ds),
                        "series": int(ds.get("SeriesNumber") or 0), "instance": int(ds.get("InstanceNumber") or 0)})
    if n_not_dicom or n_no_pixels:
        logger.info("%s: skipped %d non-DICOM file(s) and %d DICOM file(s) without pixel data", root, n_not_dicom,
                    n_no_pixels)
    if not records:
        raise ManifestError(f"{root}: no DICOM images found ({len(files)} files scanned)")
    table = pd.DataFrame(records).sort_values(["study_uid", "series", "instance", "path"], kind="stable")
    rows = []
    for study_uid, group in table.groupby("study_uid", sort=False):
        patient = group["patient_id"].iloc[0] or f"unknown-{study_uid}"
        rows.append({"patient_id": patient, "study_id": study_uid, "accession_number": group["accession"].iloc[0],
                     "study_date": group["study_date"].iloc[0], "image_paths": list(group["path"]),
                     "view_positions": list(group["view"]), "report": ""})
    frame = pd.DataFrame(rows)
    if reports is not None:
        frame = _join_reports(frame, Path(reports), report_key)
    return finalize_manifest(frame, base_dir=root, origin=str(root))


def _join_reports(frame: pd.DataFrame, reports_csv: Path, report_key: str) -> pd.DataFrame:
    if not reports_csv.exists():
        raise ManifestError(f"{reports_csv}: reports CSV not found")
    table = pd.read_csv(reports_csv, dtype=str, keep_default_na=False)
    text_col = next((c for c in _REPORT_COLUMNS if c in table), None)
    if text_col is None:
        raise ManifestError(f"{reports_csv}: no report text column (one of {', '.join(_REPORT_COLUMNS)})")
    uid_col = next((c for c in _STUDY_UID_COLUMNS if c in table), None)
    acc_col = next((c for c in _ACCESSION_COLUMNS if c in table), None)
    if report_key == "study_uid" or (report_key == "auto" and uid_col):
        if uid_col is None:
            raise ManifestError(f"{reports_csv}: no study UID column (one of {', '.join(_STUDY_UID_COLUMNS)})")
        key_col, frame_key = uid_col, "study_id"
    elif report_key in ("accession", "auto"):
        if acc_col is None:
            raise ManifestError(f"{reports_csv}: no study UID or accession number column")
        key_col, frame_key = acc_col, "accession_number"
    else:
        raise ManifestError(f"report_key must be 'auto', 'study_uid' or 'accession', not {report_key!r}")
    table[key_col] = table[key_col].str.strip()
    duplicated = table[key_col].duplicated()
    if duplicated.any():
        raise ManifestError(f"{reports_csv}: row {int(np.flatnonzero(duplicated)[0]) + 2}: duplicate key "
                            f"{table[key_col][duplicated].iloc[0]!r} in column {key_col!r}")
    by_key = table.set_index(key_col)
    matched = frame[frame_key].isin(by_key.index)
    logger.info("%s: reports matched for %d of %d studies (by %s)", reports_csv, int(matched.sum()), len(frame),
                key_col)
    frame["report"] = [by_key.at[k, text_col] if ok else "" for k, ok in zip(frame[frame_key], matched)]
    extra: dict[str, Any] = {c: c for c in CHEXPERT_LABELS if c in by_key}
    if "split" in by_key:
        extra["split"] = "split"
    for column in extra:
        frame[column] = [by_key.at[k, column] if ok else None for k, ok in zip(frame[frame_key], matched)]
    if "split" in frame and frame["split"].isna().any():
        frame = frame.drop(columns="split")  # incomplete: let finalize_manifest assign by patient for all
    return frame
