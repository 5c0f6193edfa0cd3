"""Labels for studies that come without them: the 14 CheXpert columns filled from the reports by ``rvl.nlp``.

IU X-ray, PACS exports and DICOM folders with a reports CSV carry no label columns; without labels the label-aware
contrastive targets, the label head, validation AUC and kNN voting have nothing to work with. ``rvl prepare`` calls
:func:`fill_labels`, which never overwrites a label the manifest gives and records where each row's labels came from
(``label_source``: ``manifest``, ``rvl.nlp@VERSION`` or empty).

Labelling is a fixed cost of every re-run of ``rvl prepare`` (the labeler reads ~1,500 phantom reports/s on 2 CPU
cores: minutes for a large archive), so the labels of each distinct report text are kept in a memo beside the cache
(``DIR/label_memo.parquet``, keyed by the text's sha256, with a checksum sidecar and the labeler version): a re-run,
or a run on a grown archive, labels only the reports it has not seen. The labeler is deterministic, so the labels are
those of a full run.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rvl.constants import CHEXPERT_LABELS

__all__ = ["LABEL_MODES", "MEMO_NAME", "fill_labels", "nlp_label_source"]

logger = logging.getLogger(__name__)
LABEL_MODES = ("auto", "nlp", "keep", "none")
MEMO_NAME = "label_memo.parquet"


def nlp_label_source() -> str:
    from rvl.version import __version__

    return f"rvl.nlp@{__version__}"


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _load_memo(path: Path) -> dict[str, np.ndarray]:
    """{report key: 14 label values} of the memo at ``path``; empty when absent, of another labeler version, or
    damaged (a damaged memo is never used: its reports are labelled again)."""
    from rvl.integrity import IntegrityError, check_sidecar

    if not path.is_file():
        return {}
    try:
        check_sidecar(path)
        table = pd.read_parquet(path)
    except (IntegrityError, OSError, ValueError) as err:
        logger.warning("label memo unusable (%s): labelling its reports again", err)
        return {}
    if table.empty or set(table["source"]) != {nlp_label_source()}:
        return {}
    return dict(zip(table["key"], table[CHEXPERT_LABELS].to_numpy(dtype=float)))


def _save_memo(path: Path, memo: dict[str, np.ndarray]) -> None:
    from rvl.fileio import write_atomic
    from rvl.integrity import write_sidecar

    keys = sorted(memo)
    table = pd.DataFrame(np.array([memo[k] for k in keys], dtype=float).reshape(len(keys), len(CHEXPERT_LABELS)),
                         columns=CHEXPERT_LABELS)
    table.insert(0, "key", keys)
    table["source"] = nlp_label_source()
    write_atomic(path, lambda tmp: table.to_parquet(tmp, index=False))
    write_sidecar(path)


def _label_texts(texts: list[str], memo_path: Path | None, progress: bool) -> tuple[np.ndarray, int]:
    """Labels ``(N, 14)`` of ``texts``: each distinct text labelled once, memoised ones read from the memo.
    Returns the labels and how many distinct texts the labeler read."""
    from rvl.nlp import label_reports

    keys = [_text_key(t) for t in texts]
    memo = _load_memo(memo_path) if memo_path is not None else {}
    first_of = {}
    for i, key in enumerate(keys):
        first_of.setdefault(key, i)
    todo = [k for k in first_of if k not in memo]
    if todo:
        labelled = label_reports([texts[first_of[k]] for k in todo], progress=progress)
        memo.update(zip(todo, labelled[CHEXPERT_LABELS].to_numpy(dtype=float)))
        if memo_path is not None:
            _save_memo(memo_path, memo)
    return np.array([memo[k] for k in keys], dtype=float).reshape(len(keys), len(CHEXPERT_LABELS)), len(todo)


def fill_labels(frame: pd.DataFrame, mode: str = "auto", progress: bool = False,
                memo: str | os.PathLike | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fill the CheXpert label columns of ``frame`` according to ``mode``.

    Args:
        frame: a manifest (``read_manifest`` output).
        mode: ``auto`` label from the reports only when no row has a label; ``nlp`` label every row without any
            label; ``keep`` use the manifest's labels as they are; ``none`` train without labels (all blank).
        progress: show the labeler's progress bar.
        memo: label memo file (``rvl prepare``: ``DIR/label_memo.parquet``); None labels every report.

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
    read_now = 0
    if to_label.any():
        rows = np.flatnonzero(to_label)
        labelled, read_now = _label_texts(frame["report"].iloc[rows].astype(str).tolist(),
                                          Path(memo) if memo is not None else None, progress)
        logger.info("labelled %d report(s) with %s (findings + impression): %d distinct text(s) read now, the rest "
                    "repeats or from the label memo", len(rows), nlp_label_source(), read_now)
        for j, label in enumerate(CHEXPERT_LABELS):
            column = frame[label].to_numpy(dtype=float).copy()
            column[rows] = labelled[:, j]
            frame[label] = column
        source[rows] = nlp_label_source()
    frame["label_source"] = source.astype(str)
    final = frame[CHEXPERT_LABELS].to_numpy(dtype=float)
    summary = {"mode": mode, "rows": int(len(frame)), "reports_read_by_labeler": int(read_now),
               "rows_by_source": {k or "none": int(v) for k, v in pd.Series(source).value_counts().items()},
               "positive": {label: int((final[:, i] == 1).sum()) for i, label in enumerate(CHEXPERT_LABELS)},
               "uncertain": {label: int((final[:, i] == -1).sum()) for i, label in enumerate(CHEXPERT_LABELS)}}
    return frame, summary
