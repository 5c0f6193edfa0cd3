"""Converters from public chest X-ray dataset layouts to the rvl study manifest.

``read_mimic_cxr_jpg`` (MIMIC-CXR-JPG metadata + MIMIC-CXR reports), ``read_iu_xray`` (IU X-ray / Open-i CSVs) and
``read_chexpert_csv`` (CheXpert-style per-image CSVs). Each returns the manifest DataFrame of ``read_manifest``; the
DICOM-folder converter lives in ``rvl.data.dicom_folder``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from rvl.constants import CHEXPERT_LABELS, normalize_view
from rvl.data.schema import (MIMIC_METADATA, SPLIT_ALIASES, ManifestError, compose_report, finalize_manifest,
                             labels_from)

__all__ = ["read_mimic_cxr_jpg", "read_iu_xray", "read_chexpert_csv"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ MIMIC-CXR-JPG
def read_mimic_cxr_jpg(root: str | os.PathLike, reports_dir: str | os.PathLike | None = None,
                       image_root: str | os.PathLike | None = None, image_ext: str = ".jpg") -> pd.DataFrame:
    """Convert MIMIC-CXR-JPG (metadata + optional split/chexpert CSVs) and MIMIC-CXR reports to the rvl manifest.

    Args:
        root: the dataset folder holding ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (or that file itself).
        reports_dir: folder with ``files/pXX/pSUBJECT/sSTUDY.txt`` (from mimic-cxr-reports.zip); default ``root``.
        image_root: folder with ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``; default ``root``.
        image_ext: image file extension.
    """
    root = Path(root)
    metadata = root if root.is_file() else next((root / n for n in (MIMIC_METADATA, MIMIC_METADATA + ".gz")
                                                 if (root / n).exists()), root / MIMIC_METADATA)
    root = metadata.parent
    if not metadata.exists():
        raise ManifestError(f"{metadata}: MIMIC-CXR-JPG metadata file not found")
    meta = pd.read_csv(metadata, dtype={"dicom_id": str, "subject_id": str, "study_id": str})
    missing = {"dicom_id", "subject_id", "study_id"} - set(meta.columns)
    if missing:
        raise ManifestError(f"{metadata}: missing MIMIC column(s) {sorted(missing)}")
    reports_dir = Path(reports_dir) if reports_dir else root
    image_root = Path(image_root) if image_root else root
    splits = _optional_csv(root, "mimic-cxr-2.0.0-split.csv", {"dicom_id": str, "study_id": str, "subject_id": str})
    split_by_dicom = dict(zip(splits["dicom_id"], splits["split"])) if splits is not None else {}
    labels = _optional_csv(root, "mimic-cxr-2.0.0-chexpert.csv", {"study_id": str, "subject_id": str})
    labels_by_study = labels.set_index("study_id") if labels is not None else None
    rows = []
    for study_id, group in meta.groupby("study_id", sort=False):
        subject = str(group["subject_id"].iloc[0])
        study_dir = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}"
        report_file = reports_dir / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}.txt"
        report = report_file.read_text(errors="replace").strip() if report_file.exists() else ""
        study_splits = {split_by_dicom.get(d) for d in group["dicom_id"]} - {None}
        row = {"patient_id": subject, "study_id": str(study_id),
               "study_date": group["StudyDate"].iloc[0] if "StudyDate" in group else "",
               "split": study_splits.pop() if len(study_splits) == 1 else None,
               "image_paths": [str(image_root / study_dir / f"{d}{image_ext}") for d in group["dicom_id"]],
               "view_positions": [normalize_view(v) for v in group.get("ViewPosition", [None] * len(group))],
               "report": report}
        if labels_by_study is not None and str(study_id) in labels_by_study.index:
            row.update(labels_from(labels_by_study.loc[str(study_id)]))
        rows.append(row)
    frame = pd.DataFrame(rows)
    return finalize_manifest(frame, base_dir=root, origin=str(metadata))


def _optional_csv(root: Path, name: str, dtype: dict) -> pd.DataFrame | None:
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.exists():
            return pd.read_csv(candidate, dtype=dtype)
    return None


# ------------------------------------------------------------------------------------------------- IU X-ray (Open-i)
def read_iu_xray(root: str | os.PathLike, projections: str | os.PathLike | None = None,
                 image_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Convert IU X-ray / Open-i (``indiana_reports.csv`` + ``indiana_projections.csv``) to the rvl manifest.

    Each ``uid`` is one study of one patient (no dates). ``projection`` Frontal -> "PA" (Open-i frontals are PA
    chest films), Lateral -> "LATERAL". The report is INDICATION / COMPARISON / FINDINGS / IMPRESSION.

    Args:
        root: folder holding ``indiana_reports.csv`` (or that file itself).
        projections: ``indiana_projections.csv``; default next to the reports file.
        image_dir: folder of the image files; default the first of ``images/images_normalized``, ``images``,
            the reports folder that holds the first listed image.
    """
    root = Path(root)
    reports_csv = root if root.is_file() else root / "indiana_reports.csv"
    projections = Path(projections) if projections else reports_csv.parent / "indiana_projections.csv"
    for f in (reports_csv, projections):
        if not f.exists():
            raise ManifestError(f"{f}: IU X-ray file not found")
    reports = pd.read_csv(reports_csv, dtype={"uid": str})
    views = pd.read_csv(projections, dtype={"uid": str})
    for f, table, cols in ((reports_csv, reports, {"uid"}), (projections, views, {"uid", "filename", "projection"})):
        if cols - set(table.columns):
            raise ManifestError(f"{f}: missing IU column(s) {sorted(cols - set(table.columns))}")
    base = reports_csv.parent
    if image_dir is None:
        first = str(views["filename"].iloc[0]) if len(views) else ""
        candidates = [base / "images" / "images_normalized", base / "images", base]
        image_dir = next((c for c in candidates if (c / first).exists()), candidates[-1])
    image_dir = Path(image_dir)
    views_by_uid = {uid: g for uid, g in views.groupby("uid", sort=False)}
    rows = []
    for _, rep in reports.iterrows():
        group = views_by_uid.get(rep["uid"])
        if group is None:
            logger.info("IU X-ray: report uid %s has no images; skipped", rep["uid"])
            continue
        view_names = ["LATERAL" if str(p).strip().lower().startswith("lat") else "PA" for p in group["projection"]]
        rows.append({"patient_id": rep["uid"], "study_id": rep["uid"], "study_date": "",
                     "image_paths": [str(image_dir / f) for f in group["filename"]], "view_positions": view_names,
                     "report": compose_report({k: rep.get(k) for k in ("indication", "comparison", "findings",
                                                                       "impression")})})
    if not rows:
        raise ManifestError(f"{reports_csv}: no study has images in {projections}")
    return finalize_manifest(pd.DataFrame(rows), base_dir=base, origin=str(reports_csv))


# --------------------------------------------------------------------------------------------------- CheXpert-style
def read_chexpert_csv(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Convert a CheXpert-style per-image CSV (Path, Sex, Age, Frontal/Lateral, AP/PA, labels) to the rvl manifest.

    Images are grouped into studies by their folder (``.../patient00001/study1/view1_frontal.jpg``). Study labels
    combine the views' labels (1 wins, then -1, then 0). The split comes from the path (train/valid/test) when
    present, else by patient. Reports come from a ``Report``/``report`` column or CheXpert Plus ``section_*`` columns
    when present, else are empty.

    Args:
        csv_path: the CSV file.
        image_root: folder the ``Path`` column is relative to; default the first of the CSV's folder and its parents
            in which the first image exists.
    """
    csv_path = Path(csv_path)
    table = pd.read_csv(csv_path)
    path_col = "Path" if "Path" in table else ("path_to_image" if "path_to_image" in table else None)
    if path_col is None:
        raise ManifestError(f"{csv_path}: no 'Path' column (CheXpert-style CSV expected)")
    if image_root is None:
        first = str(table[path_col].iloc[0]) if len(table) else ""
        candidates = [csv_path.parent, *csv_path.parent.parents]
        image_root = next((c for c in candidates if (c / first).exists()), csv_path.parent)
    image_root = Path(image_root)
    rows = []
    table["_study_dir"] = [os.path.dirname(str(p)) for p in table[path_col]]
    for study_dir, group in table.groupby("_study_dir", sort=False):
        parts = Path(study_dir).parts
        patient = next((p for p in reversed(parts) if p.startswith("patient")), parts[-2] if len(parts) > 1 else
                       study_dir)
        split = next((SPLIT_ALIASES[p] for p in parts if p in SPLIT_ALIASES), None)
        views = []
        for _, r in group.iterrows():
            lateral = str(r.get("Frontal/Lateral", "")).strip().lower().startswith("lat")
            views.append("LATERAL" if lateral else normalize_view(r.get("AP/PA")))
        row = {"patient_id": patient, "study_id": f"{patient}_{parts[-1]}" if parts else study_dir,
               "study_date": "", "split": split, "image_paths": [str(image_root / p) for p in group[path_col]],
               "view_positions": views, "report": _chexpert_report(group.iloc[0])}
        for label in CHEXPERT_LABELS:
            values = pd.to_numeric(group[label], errors="coerce") if label in group else pd.Series(dtype=float)
            row[label] = (1.0 if (values == 1).any() else -1.0 if (values == -1).any() else
                          0.0 if (values == 0).any() else np.nan)
        rows.append(row)
    if not rows:
        raise ManifestError(f"{csv_path}: no images listed")
    frame = pd.DataFrame(rows)
    return finalize_manifest(frame, base_dir=image_root, origin=str(csv_path))


def _chexpert_report(row: pd.Series) -> str:
    for col in ("Report", "report"):
        if col in row and isinstance(row[col], str):
            return row[col]
    sections = {c[len("section_"):]: row[c] for c in row.index if str(c).startswith("section_")}
    return compose_report(sections) if sections else ""
