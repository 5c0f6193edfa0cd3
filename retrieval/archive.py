"""Archives larger than RAM: embeddings streamed in batches, IVF indexes whose inverted lists live on disk.

    batches = iter_embedding_batches("emb/", ids="ids.npy", batch_size=65_536)   # memory-mapped .npy shards
    index = build_on_disk_index(batches, "idx_archive", "IVF65536_HNSW32,SQ8", train_vectors=sample_rows("emb/", 2**21))

Only one batch of embeddings is in memory at a time. The lists are written straight into ``index.ivfdata`` (FAISS
``OnDiskInvertedLists``) inside the folder being saved, and memory-mapped on load, so RAM holds the coarse quantiser,
the id map and the pages the searches touch. Removed ids are hidden at search time (``removed_ids.npy``) until the
index is rebuilt.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import faiss
import numpy as np
import pandas as pd

from .choose import trained_empty_index, recall_at_k, search_param_grid, sweep_search_params
from .index import EmbeddingIndex
from .ops import _as_ids, exact_top_k, faiss_stdout_silenced, normalize_rows
from .store import ON_DISK_LISTS_FILE, atomic_write_dir

logger = logging.getLogger(__name__)


def _shards(source: str | os.PathLike) -> list[Path]:
    source = Path(source)
    shards = sorted(source.glob("*.npy")) if source.is_dir() else [source]
    if not shards or not all(p.is_file() for p in shards):
        raise FileNotFoundError(f"{source}: no .npy embedding file(s)")
    return shards


def iter_embedding_batches(source: str | os.PathLike, ids: str | os.PathLike | np.ndarray | None = None,
                           batch_size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(vectors, ids)`` batches of a ``(n, d)`` ``.npy`` file or a folder of ``.npy`` shards (in name order, e.g.
    clip-retrieval's ``img_emb_0.npy``...), memory-mapped so that only one batch is read at a time.

    Args:
        source: ``.npy`` file or folder of ``.npy`` shards.
        ids: ``.npy`` file / array of int64 ids aligned with the rows over all shards (default: row numbers).
        batch_size: Rows per batch.
    """
    all_ids = np.load(ids, mmap_mode="r") if isinstance(ids, (str, os.PathLike)) else ids
    offset = 0
    for shard in _shards(source):
        array = np.load(shard, mmap_mode="r")
        if array.ndim != 2:
            raise ValueError(f"{shard}: expected a 2-D (n, dim) array, got shape {array.shape}")
        for start in range(0, len(array), batch_size):
            rows = np.asarray(array[start:start + batch_size], np.float32)
            span = np.arange(offset + start, offset + start + len(rows))
            if all_ids is not None and span[-1] >= len(all_ids):
                raise ValueError(f"{ids}: {len(all_ids)} ids for more embedding rows (shard {shard.name})")
            yield rows, (np.asarray(all_ids[span], np.int64) if all_ids is not None else span.astype(np.int64))
        offset += len(array)
    if all_ids is not None and offset != len(all_ids):
        raise ValueError(f"{ids}: {len(all_ids)} ids for {offset} embedding rows")


def sample_rows(source: str | os.PathLike, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random rows (all if fewer) of a ``.npy`` file or folder of shards, read without loading the rest."""
    arrays = [np.load(p, mmap_mode="r") for p in _shards(source)]
    sizes = np.cumsum([0] + [len(a) for a in arrays])
    rows = np.sort(np.random.default_rng(seed).choice(sizes[-1], min(n, sizes[-1]), replace=False))
    shard = np.searchsorted(sizes, rows, side="right") - 1
    return np.concatenate([np.asarray(arrays[s][rows[shard == s] - sizes[s]], np.float32)
                           for s in np.unique(shard)])


def build_on_disk_index(batches: Iterable[tuple], out: str | os.PathLike, factory: str, train_vectors: np.ndarray,
                        *, model_fingerprint: str | None = None, extra: dict[str, Any] | None = None,
                        target_recall: float = 0.95, k: int = 10, n_queries: int = 256,
                        seed: int = 0) -> EmbeddingIndex:
    """Stream batches into an IVF index with on-disk inverted lists, tune nprobe, and save the folder atomically.

    One pass over ``batches``: each batch is added to the lists and scanned exactly for the tuning queries (rows of
    ``train_vectors``), so the exact neighbours needed for tuning come without a second pass or a second copy.

    Args:
        batches: ``(vectors, ids)`` or ``(vectors, ids, metadata)`` batches (e.g. :func:`iter_embedding_batches`).
        out: Index folder to write (``index.faiss`` + ``index.ivfdata`` + ``metadata.parquet`` + ``index.json``).
        factory: An IVF factory string, e.g. ``"IVF65536_HNSW32,SQ8"`` or ``"IVF16384,PQ64"``.
        train_vectors: Sample for k-means / codebook training (e.g. :func:`sample_rows`).
        model_fingerprint: Identifier of the embedding model.
        extra: Free-form JSON-able info for the header.
        target_recall: nprobe is the smallest reaching this recall@k on ``n_queries`` training rows (their own hit
            left out when they are in the archive) against the exact scan.
        k: Neighbours per query for tuning.
        n_queries: Tuning queries.
        seed: Seed of the training sample and tuning queries.
    """
    started = time.perf_counter()
    train_vectors = normalize_rows(train_vectors)
    queries = train_vectors[np.random.default_rng(seed + 1).choice(len(train_vectors),
                                                                   min(n_queries, len(train_vectors)), False)]

    def write(folder: Path) -> None:
        index = trained_empty_index(factory, train_vectors, seed)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            raise ValueError(f"on-disk inverted lists need an IVF factory, got {factory!r}")
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(folder / ON_DISK_LISTS_FILE))
        ivf.replace_invlists(lists, True)
        lists.this.disown()
        rows: list[pd.DataFrame] = []
        nearest = _RunningTopK(queries, k + 1)
        for batch in batches:
            vectors, ids, metadata = (*batch, None)[:3]
            vectors, ids = normalize_rows(vectors), _as_ids(ids, len(batch[0]))
            if vectors.shape[1] != index.d:
                raise ValueError(f"batch of dim {vectors.shape[1]}, training vectors have dim {index.d}")
            with faiss_stdout_silenced():  # on-disk lists print each file resize
                index.add_with_ids(vectors, ids)
            nearest.update(vectors, ids)
            frame = metadata.reset_index(drop=True) if metadata is not None else pd.DataFrame(index=range(len(ids)))
            rows.append(frame.assign(id=ids))
            logger.info("on-disk index: %d vectors added", index.ntotal)
        metadata = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({"id": np.zeros(0, np.int64)})
        if len(np.unique(metadata["id"])) != len(metadata):
            raise ValueError("ids must be unique across batches")
        result = EmbeddingIndex(index, factory, metadata, model_fingerprint, extra=extra,
                                choice={"method": "given, on-disk lists", "factory": factory})
        _tune(result, queries, nearest, target_recall, k)
        result.choice["build_s"] = round(time.perf_counter() - started, 2)
        result.write_files(folder)

    atomic_write_dir(out, write)
    return EmbeddingIndex.load(out)


class _RunningTopK:
    """Exact top-k of fixed queries over vectors that arrive in batches."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def update(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        scores, found = exact_top_k(self.queries, vectors, ids, self.k)
        merged_s, merged_i = np.hstack([self.scores, scores]), np.hstack([self.ids, found])
        top = np.argsort(-merged_s, axis=1, kind="stable")[:, :self.k]
        self.scores, self.ids = np.take_along_axis(merged_s, top, 1), np.take_along_axis(merged_i, top, 1)


def _tune(index: EmbeddingIndex, queries: np.ndarray, nearest: _RunningTopK, target_recall: float, k: int) -> None:
    """Set the smallest nprobe reaching the target recall@k on ``queries`` against their exact neighbours."""
    # a sample row that is in the archive finds itself first (score 1): leave it out of both lists
    own = np.where(nearest.scores[:, :1] > 1 - 1e-5, nearest.ids[:, :1], -3)
    truth = np.where(own >= 0, nearest.ids[:, 1:], nearest.ids[:, :k])

    def recall(found: np.ndarray) -> float:
        return recall_at_k(np.where(found == own, -2, found), truth)

    params, got, _, reached = sweep_search_params(index.faiss_index, search_param_grid(index.faiss_index), recall,
                                                  queries, k + 1, target_recall)
    index.set_search_params(params)
    index.choice.update(search_params=params, recall=round(got, 4), recall_queries="sampled database vectors")
    if not reached:
        logger.warning("on-disk index: recall@%d target %.2f not reached; using %s", k, target_recall, params)
