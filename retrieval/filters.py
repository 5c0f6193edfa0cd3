"""Metadata filters for retrieval: same-patient exclusion and "similar prior studies" (same patient, earlier date).

Filters turn the index metadata into id sets that :meth:`EmbeddingIndex.search` applies with FAISS ID selectors (or an
exact search inside small subsets), so a filtered search always returns ``k`` results when ``k`` allowed ones exist.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .index import ID_COLUMN, EmbeddingIndex


def _dates(metadata: pd.DataFrame) -> pd.Series:
    if "study_date" not in metadata:
        raise ValueError("index metadata has no 'study_date' column; date filters need it")
    return pd.to_datetime(metadata["study_date"], errors="coerce")


def filter_ids(metadata: pd.DataFrame, *, patient_id: str | None = None, before: str | None = None,
               after: str | None = None, exclude_patient: str | None = None,
               exclude_ids: Any = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Translate patient / date filters into ``(allowed_ids, excluded_ids)`` for :meth:`EmbeddingIndex.search`.

    Args:
        metadata: Index metadata with ``id``, ``patient_id`` and (for date filters) ``study_date`` columns.
        patient_id: Keep only this patient's studies.
        before: Keep only studies strictly before this date (``YYYY-MM-DD``).
        after: Keep only studies strictly after this date.
        exclude_patient: Drop this patient's studies (leakage guard for "similar studies of other patients").
        exclude_ids: Drop these ids (e.g. the query study itself).

    Returns:
        ``allowed_ids`` (``None`` = no restriction) and ``excluded_ids`` (``None`` = nothing excluded).
    """
    keep = pd.Series(True, index=metadata.index)
    restricted = False
    if patient_id is not None or exclude_patient is not None:
        if "patient_id" not in metadata:
            raise ValueError("index metadata has no 'patient_id' column; patient filters need it")
        patients = metadata["patient_id"].astype(str)
    if patient_id is not None:
        keep &= patients == str(patient_id)
        restricted = True
    for bound, compare in ((before, "lt"), (after, "gt")):
        if bound is not None:
            limit = pd.to_datetime(bound, errors="coerce")
            if pd.isna(limit):
                raise ValueError(f"invalid date {bound!r}; expected YYYY-MM-DD")
            keep &= getattr(_dates(metadata), compare)(limit).fillna(False)
            restricted = True
    excluded = np.asarray([] if exclude_ids is None else list(np.atleast_1d(exclude_ids)), np.int64)
    if exclude_patient is not None:
        excluded = np.union1d(excluded, metadata.loc[patients == str(exclude_patient), ID_COLUMN].to_numpy(np.int64))
    allowed = metadata.loc[keep, ID_COLUMN].to_numpy(np.int64) if restricted else None
    return allowed, (excluded if len(excluded) else None)


def search_filtered(index: EmbeddingIndex, queries: np.ndarray, k: int = 5, **filters: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`EmbeddingIndex.search` with the metadata filters of :func:`filter_ids` (``patient_id``, ``before``,
    ``after``, ``exclude_patient``, ``exclude_ids``)."""
    allowed, excluded = filter_ids(index.metadata, **filters)
    return index.search(queries, k, allowed_ids=allowed, excluded_ids=excluded)


def similar_prior_studies(index: EmbeddingIndex, query: np.ndarray, patient_id: str, before: str,
                          k: int = 5) -> pd.DataFrame:
    """The ``k`` most similar studies of ``patient_id`` dated before ``before``, as metadata rows with a ``score``."""
    scores, ids = search_filtered(index, query, k, patient_id=patient_id, before=before)
    return results_frame(index, scores[0], ids[0])


def results_frame(index: EmbeddingIndex, scores: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
    """Metadata rows of one query's hits (ids -1 dropped), best first, with ``rank`` and ``score`` columns."""
    valid = ids >= 0
    rows = index.metadata.loc[ids[valid]].reset_index(drop=True)
    rows.insert(0, "score", scores[valid].astype(float))
    rows.insert(0, "rank", np.arange(1, int(valid.sum()) + 1))
    return rows
