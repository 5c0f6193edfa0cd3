"""Vector-level helpers of the index: normalisation, id checks, exact top-k, FAISS search parameters, tuning."""
from __future__ import annotations

import logging
from typing import Any, Iterable

import faiss
import numpy as np

logger = logging.getLogger(__name__)


def normalize_rows(vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Return a float32, C-contiguous, L2-normalised copy of a 2-D array."""
    array = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or inf")
    faiss.normalize_L2(array)
    return array


def _as_ids(ids: Iterable[int] | np.ndarray, n: int | None = None) -> np.ndarray:
    out = np.ascontiguousarray(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).astype(np.int64))
    if out.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {out.shape}")
    if n is not None and len(out) != n:
        raise ValueError(f"got {n} vectors but {len(out)} ids")
    if (out < 0).any():
        raise ValueError("ids must be >= 0 (-1 marks 'no result' in search output)")
    if len(np.unique(out)) != len(out):
        raise ValueError("ids must be unique")
    return out


def _search_parameters(inner: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying ``selector`` and the index's current nprobe / efSearch (params override them)."""
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    return faiss.SearchParameters(sel=selector)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` against (``vectors``, ``ids``); pads with -1 / -inf."""
    n_q = len(queries)
    scores_out = np.full((n_q, k), -np.inf, dtype=np.float32)
    ids_out = np.full((n_q, k), -1, dtype=np.int64)
    if len(ids) == 0:
        return scores_out, ids_out
    sims = queries @ vectors.T
    top = min(k, len(ids))
    part = np.argpartition(-sims, top - 1, axis=1)[:, :top]
    order = np.take_along_axis(-sims, part, axis=1).argsort(axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    scores_out[:, :top] = np.take_along_axis(sims, best, axis=1)
    ids_out[:, :top] = ids[best]
    return scores_out, ids_out


def tune_search_params(index: Any, vectors: np.ndarray, ids: np.ndarray, target_recall: float = 0.95, k: int = 10,
                       n_queries: int = 256, seed: int = 0) -> str:
    """Set and return the cheapest nprobe / efSearch of an ``EmbeddingIndex`` whose recall@k (vs exact) on a sample
    of its data reaches the target.

    Queries are sampled database vectors; each one's own hit is dropped from both result lists. An HNSW query that
    is itself a graph node reaches its neighbours through its own edges, so its sample recall overestimates the
    recall of new queries (by ~0.02-0.04 at 0.95 in bench/bench_retrieval.py); HNSW is therefore tuned to halve the
    remaining error (0.975 for a 0.95 target).
    """
    inner = index.inner_index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        name, values = "nprobe", [v for v in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
                                  if v <= ivf.nlist]
    elif isinstance(inner, faiss.IndexHNSW):
        name, values = "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
        target_recall = target_recall + (1.0 - target_recall) / 2
    else:
        return index.search_params
    vectors = normalize_rows(vectors)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
    queries, own = vectors[rows], np.asarray(ids, np.int64)[rows]
    _, truth = exact_top_k(queries, vectors, np.asarray(ids, np.int64), k + 1)

    def recall(found: np.ndarray) -> float:
        hits = [len((set(f) - {o, -1}) & (set(t) - {o})) / k for f, t, o in zip(found, truth, own)]
        return float(np.mean(hits))

    chosen = f"{name}={values[-1]}"
    for value in values:
        index.set_search_params(f"{name}={value}")
        got = recall(index.faiss_index.search(queries, k + 1)[1])
        if got >= target_recall:
            chosen = f"{name}={value}"
            logger.info("tuned %s: %s gives recall@%d %.3f on %d sampled queries", index.factory, chosen, k, got,
                        len(rows))
            break
    else:
        logger.warning("%s: recall@%d target %.2f not reached; using %s", index.factory, k, target_recall, chosen)
    index.set_search_params(chosen)
    return chosen
