"""Labels for studies that come without them: the 14 CheXpert columns filled from the reports by ``rvl.nlp``.

IU X-ray, PACS exports and DICOM folders with a reports CSV carry no label columns; without labels the label-aware
contrastive targets, the label head, validation AUC and kNN voting have nothing to work with. ``rvl prepare`` calls
:func:`fill_labels`, which never overwrites a label the manifest gives and records where each row's labels came from
(``label_source``: ``manifest``, ``rvl.nlp@VERSION`` or empty).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from rvl.constants import CHEXPERT_LABELS

__all__ = ["LABEL_MODES", "fill_labels", "nlp_label_source"]

logger = logging.getLogger(__name__)
LABEL_MODES = ("auto", "nlp", "keep", "none")


def nlp_label_source() -> str:
    from rvl.version import __version__

    return f"rvl.nlp@{__version__}"


def fill_labels(frame: pd.DataFrame, mode: str = "auto", progress: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fill the CheXpert label columns of ``frame`` according to ``mode``.

    Args:
        frame: a manifest (``read_manifest`` output).
        mode: ``auto`` label from the reports only when no row has a label; ``nlp`` label every row without any
            label; ``keep`` use the manifest's labels as they are; ``none`` train without labels (all blank).
        progress: show the labeler's progress bar.

    Returns:
        (frame with ``label_source``, summary: mode, rows per source, positives / uncertain per label).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {mode!r}")
    frame = frame.copy()
    values = frame[CHEXPERT_LABELS].to_numpy(dtype=float)
    has_labels = ~np.isnan(values).all(axis=1)
    if "label_source" in frame:  # a manifest written by rvl (an earlier prepare) says where its labels are from
        source = frame["label_source"].fillna("").astype(str).to_numpy(dtype=object)
        source[has_labels & (source == "")] = "manifest"
    else:
        source = np.where(has_labels, "manifest", "").astype(object)
    if mode == "none":
        frame[CHEXPERT_LABELS] = np.nan
        source[:] = ""
    to_label = np.zeros(len(frame), bool)
    if mode == "nlp" or (mode == "auto" and not has_labels.any()):
        to_label = ~has_labels & (frame["report"].fillna("").astype(str).str.strip() != "").to_numpy()
    if to_label.any():
        from rvl.nlp import label_reports

        rows = np.flatnonzero(to_label)
        logger.info("labelling %d report(s) with %s (findings + impression)", len(rows), nlp_label_source())
        labelled = label_reports(frame["report"].iloc[rows].tolist(), progress=progress)
        for label in CHEXPERT_LABELS:
            column = frame[label].to_numpy(dtype=float).copy()
            column[rows] = labelled[label].to_numpy(dtype=float)
            frame[label] = column
        source[rows] = nlp_label_source()
    frame["label_source"] = source.astype(str)
    final = frame[CHEXPERT_LABELS].to_numpy(dtype=float)
    summary = {"mode": mode, "rows": int(len(frame)),
               "rows_by_source": {k or "none": int(v) for k, v in pd.Series(source).value_counts().items()},
               "positive": {label: int((final[:, i] == 1).sum()) for i, label in enumerate(CHEXPERT_LABELS)},
               "uncertain": {label: int((final[:, i] == -1).sum()) for i, label in enumerate(CHEXPERT_LABELS)}}
    return frame, summary
