"""Vector-level helpers of the index: normalisation, id checks, exact top-k, FAISS search parameters, tuning."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def _search_parameters(inner: faiss.Index, selector: faiss.IDSelector) -> list[faiss.SearchParameters]:
    """Search parameters carrying ``selector`` and the index's current nprobe / efSearch / k_factor.

    The first element is the one to pass to ``search``; the rest are nested parameters it points to, returned so the
    caller keeps them alive (SWIG does not).
    """
    if isinstance(inner, faiss.IndexRefine):
        nested = _search_parameters(faiss.downcast_index(inner.base_index), selector)
        return [faiss.IndexRefineSearchParameters(k_factor=inner.k_factor, base_index_params=nested[0]), *nested]
    if isinstance(inner, faiss.IndexHNSW):
        return [faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)]
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return [faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)]
    return [faiss.SearchParameters(sel=selector)]


def remove_from_ivf(index: faiss.IndexIDMap2, ids: np.ndarray) -> int:
    """Remove ``ids`` from an ``IDMap2`` over an in-memory IVF index; returns how many were removed.

    ``IndexIDMap2.remove_ids`` assumes the inner index renumbers its vectors like a flat array does, but IVF lists
    keep their stored positions, so after it the id map points at the wrong vectors. Here the positions are removed
    from the lists, the survivors' positions renumbered in place, and the id map compacted to match.
    """
    stored = faiss.vector_to_array(index.id_map)
    drop = np.isin(stored, ids)
    if not drop.any():
        return 0
    ivf = faiss.extract_index_ivf(index)
    removed = int(ivf.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(drop).astype(np.int64))))
    new_position = np.cumsum(~drop) - 1
    lists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if size:
            positions = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
            positions[:] = new_position[positions]
    faiss.copy_array_to_vector(np.ascontiguousarray(stored[~drop]), index.id_map)
    index.ntotal = int((~drop).sum())
    index.construct_rev_map()
    return removed


def copy_ivf_without(index: faiss.IndexIDMap2, drop: np.ndarray, lists_path: Path) -> faiss.IndexIDMap2:
    """A copy of an ``IDMap2``-over-IVF index without the entries whose ids are in ``drop``, its inverted lists
    written to a new on-disk file ``lists_path`` list by list (the trained quantiser and codec are copied; nothing is
    re-encoded, and only one list is in memory at a time)."""
    copy = faiss.deserialize_index(faiss.serialize_index(index))  # on-disk lists serialise as a file reference
    source, target = faiss.extract_index_ivf(index), faiss.extract_index_ivf(copy)
    stored = faiss.vector_to_array(index.id_map)
    keep = ~np.isin(stored, drop)
    new_position = np.cumsum(keep) - 1
    lists = faiss.OnDiskInvertedLists(source.nlist, source.code_size, str(lists_path))
    old = source.invlists
    for list_no in range(source.nlist):
        size = old.list_size(list_no)
        if not size:
            continue
        positions = faiss.rev_swig_ptr(old.get_ids(list_no), size).copy()
        codes = faiss.rev_swig_ptr(old.get_codes(list_no), size * source.code_size).reshape(size, -1)
        kept = keep[positions]
        if kept.any():
            # named arrays: a temporary passed to swig_ptr can be freed before FAISS reads it
            renumbered = np.ascontiguousarray(new_position[positions[kept]])
            kept_codes = np.ascontiguousarray(codes[kept])
            lists.add_entries(list_no, int(kept.sum()), faiss.swig_ptr(renumbered), faiss.swig_ptr(kept_codes))
    target.replace_invlists(lists, True)
    lists.this.disown()
    target.ntotal = int(keep.sum())
    faiss.copy_array_to_vector(np.ascontiguousarray(stored[keep]), copy.id_map)
    copy.ntotal = int(keep.sum())
    copy.construct_rev_map()
    return copy


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
                       n_queries: int = 256, seed: int = 0, report: dict[str, Any] | None = None) -> str:
    """Set and return the cheapest nprobe / efSearch of an ``EmbeddingIndex`` whose recall@k (vs exact) on a sample
    of its data reaches the target (for a given factory; without one ``build`` measures on held-out queries).

    Queries are sampled database vectors; each one's own hit is dropped from both result lists. An HNSW query that
    is itself a graph node reaches its neighbours through its own edges, so its sample recall overestimates the
    recall of new queries (by ~0.02-0.04 at 0.95 in bench/bench_retrieval.py); HNSW is therefore tuned to halve the
    remaining error (0.975 for a 0.95 target). ``report`` (if given) receives the sample ``recall``.
    """
    from .choose import search_param_grid, sweep_search_params

    grid = search_param_grid(index.faiss_index)
    if grid == [""]:
        return index.search_params
    if isinstance(index.inner_index, faiss.IndexHNSW):
        target_recall = target_recall + (1.0 - target_recall) / 2
    vectors = normalize_rows(vectors)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
    queries, own = vectors[rows], np.asarray(ids, np.int64)[rows]
    _, truth = exact_top_k(queries, vectors, np.asarray(ids, np.int64), k + 1)

    def recall(found: np.ndarray) -> float:
        hits = [len((set(f) - {o, -1}) & (set(t) - {o})) / k for f, t, o in zip(found, truth, own)]
        return float(np.mean(hits))

    chosen, got, _, reached = sweep_search_params(index.faiss_index, grid, recall, queries, k + 1, target_recall)
    if reached:
        logger.info("tuned %s: %s gives recall@%d %.3f on %d sampled queries", index.factory, chosen, k, got,
                    len(rows))
    else:
        logger.warning("%s: recall@%d target %.2f not reached; using %s", index.factory, k, target_recall, chosen)
    index.set_search_params(chosen)
    if report is not None:
        report.update(recall=round(got, 4), recall_queries="sampled database vectors")
    return chosen


@contextlib.contextmanager
def faiss_stdout_silenced() -> Iterator[None]:
    """Silence FAISS's C-level ``printf`` chatter of on-disk lists ("resizing ...", "IO_FLAG_ONDISK_SAME_DIR:
    updating ...") so it cannot corrupt a command's stdout (``rvl search --json``)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def on_disk_lists_in(index: faiss.Index, folder: Path) -> Iterator[None]:
    """While writing ``index`` into ``folder``: put its on-disk inverted lists there too (a hard link when the file
    system allows, else a copy) and point the index at them, so the folder is self-contained."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        yield
        return
    from .store import ON_DISK_LISTS_FILE

    source, target = Path(lists.filename), Path(folder) / ON_DISK_LISTS_FILE
    if source.resolve() != target.resolve():
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    lists.filename = str(target)
    try:
        yield
    finally:
        lists.filename = str(source)
