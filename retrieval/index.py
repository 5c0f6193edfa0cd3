"""``EmbeddingIndex``: a FAISS inner-product index over L2-normalised embeddings, with ids, metadata and a header.

Vectors are L2-normalised on the way in (build, add and queries), so inner product = cosine similarity. The FAISS
index is always wrapped in ``IndexIDMap2`` (``"IDMap2,<factory>"``) so that ids are the caller's int64 ids and vectors
can be reconstructed by id (needed for exact search inside small filtered subsets). The CPU index is the master copy;
when faiss-gpu and a GPU are present a GPU clone serves unfiltered searches (not HNSW, on-disk lists, or while removed
ids are hidden) and is dropped on every change. Without a factory, ``build`` picks the index by measurement
(``choose.py``); adding in batches, removal on every kind and compaction live in ``edit.py``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np
import pandas as pd

from rvl.version import __version__

from .choose import DEFAULT_BUDGET_S, choose_index, make_index
from .edit import ID_COLUMN, IndexEditing
from .ops import (_as_ids, _search_parameters, exact_top_k, faiss_stdout_silenced, normalize_rows, on_disk_lists_in,
                  tune_search_params)
from .store import (HEADER_FILE, INDEX_FILE, METADATA_FILE, ON_DISK_LISTS_FILE, REMOVED_FILE, atomic_write_dir,
                    read_json, resolve_index_dir, write_json)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FLAT_MAX_VECTORS = 50_000  # exact search below this: ~10 ms/query on 1 core at d=512, and no training needed


class IndexMismatchError(ValueError):
    """The index on disk was built for different embeddings (model fingerprint or dimension) than requested."""


def default_factory(n_vectors: int, dim: int) -> str:
    """FAISS factory string for a collection size alone (without the ``IDMap2`` wrapper).

    Kept for callers that want a size rule; ``EmbeddingIndex.build`` without a factory measures candidates instead
    (:func:`rvl.retrieval.choose.choose_index`). ``Flat`` (exact) for small collections; above
    :data:`FLAT_MAX_VECTORS` an inverted file with ~2·sqrt(n) lists,
    searched with the ``nprobe`` tuned at build time (see :meth:`EmbeddingIndex.tune`). IVF, unlike HNSW, supports
    ``remove_ids`` and GPU search. Above 4M vectors the lists hold 8-bit scalar-quantised codes (4x smaller).
    """
    if n_vectors <= FLAT_MAX_VECTORS:
        return "Flat"
    n_lists = 2 ** int(round(math.log2(2 * math.sqrt(n_vectors))))
    return f"IVF{n_lists},{'SQ8' if n_vectors > 4_000_000 else 'Flat'}"


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class EmbeddingIndex(IndexEditing):
    """Inner-product FAISS index over normalised embeddings with int64 ids, a metadata table and a JSON header.

    Args:
        index: A FAISS ``IndexIDMap2`` with ``METRIC_INNER_PRODUCT``.
        factory: The factory string of the wrapped index (e.g. ``"Flat"``, ``"IVF1024,Flat"``).
        metadata: One row per id, with an ``id`` column; ``None`` for ids only.
        model_fingerprint: Identifies the embedding model; ``load`` refuses a different one.
        search_params: FAISS ``ParameterSpace`` string applied before searching (e.g. ``"nprobe=16"``).
        extra: Free-form JSON-able info stored in ``index.json`` (e.g. model dir, embedding kind).
        device: ``"auto"`` (GPU when faiss-gpu sees one), ``"cpu"`` or ``"gpu"``.
        removed_ids: Ids still stored in ``index`` but removed (indexes that cannot delete in place); never returned.
        choice: How the index was chosen and how it measured (``index.json`` ``choice``; see ``build``).
    """

    def __init__(self, index: faiss.Index, factory: str, metadata: pd.DataFrame | None = None,
                 model_fingerprint: str | None = None, search_params: str = "", extra: dict[str, Any] | None = None,
                 device: str = "auto", *, removed_ids: np.ndarray | None = None,
                 choice: dict[str, Any] | None = None) -> None:
        if not isinstance(index, faiss.IndexIDMap2):
            raise TypeError(f"expected a faiss.IndexIDMap2, got {type(index).__name__}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("EmbeddingIndex needs an inner-product index (METRIC_INNER_PRODUCT)")
        self._index = index
        self.factory = factory
        self.model_fingerprint = model_fingerprint
        self.extra = dict(extra or {})
        self.device = device
        self.choice = choice
        self._gpu_index: faiss.Index | None = None
        self._removed = np.unique(np.asarray([] if removed_ids is None else removed_ids, np.int64))
        self.search_params = ""
        self.set_search_params(search_params)
        ids = self.ids
        if metadata is None:
            metadata = pd.DataFrame({ID_COLUMN: ids})
        self.metadata = self._check_metadata(metadata, ids)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, factory: str | None = None,
              metadata: pd.DataFrame | None = None, model_fingerprint: str | None = None, *,
              target_recall: float = 0.95, extra: dict[str, Any] | None = None, device: str = "auto",
              seed: int = 0, budget_s: float = DEFAULT_BUDGET_S, max_bytes_per_vector: float | None = None,
              candidates: list[str] | None = None) -> "EmbeddingIndex":
        """Build an index from float vectors (normalised here) and unique int64 ids.

        Without a factory the index is chosen by measurement (:func:`rvl.retrieval.choose.choose_index`): the
        fastest candidate reaching ``target_recall`` on held-out queries, never one slower than exact ``Flat``.
        The choice, its recall, speed-up and build time are kept in :attr:`choice` (``index.json``).

        Args:
            vectors: ``(n, d)`` float array.
            ids: ``(n,)`` unique non-negative int64 ids.
            factory: FAISS factory string without ``IDMap2`` (``None`` = chosen by measurement).
            metadata: Optional table aligned with ``vectors`` (one row each); an ``id`` column is added or checked.
            model_fingerprint: Identifier of the embedding model (stored, checked by ``load``).
            target_recall: Approximate indexes tune nprobe / efSearch to reach this recall@10 on a sample.
            extra: Free-form JSON-able info for the header.
            device: ``"auto"``, ``"cpu"`` or ``"gpu"``.
            seed: Seed of the training / tuning samples.
            budget_s: Build-time budget of the measured choice (candidates that would overrun it are skipped).
            max_bytes_per_vector: Memory budget of the measured choice (candidates needing more are left out).
            candidates: Factories the measured choice tries (default: those that fit the collection).
        """
        started = time.perf_counter()
        vectors = normalize_rows(vectors)
        ids = _as_ids(ids, len(vectors))
        metadata = cls._aligned_metadata(metadata, ids)
        if factory is None:
            index, factory, params, choice = choose_index(vectors, ids, target_recall, budget_s=budget_s,
                                                          max_bytes_per_vector=max_bytes_per_vector,
                                                          candidates=candidates, seed=seed)
            out = cls(index, factory, metadata, model_fingerprint, params, extra=extra, device=device, choice=choice)
        else:
            index = make_index(factory, vectors, ids, seed=seed)
            out = cls(index, factory, metadata, model_fingerprint, extra=extra, device=device,
                      choice={"method": "given", "factory": factory})
            if out.is_approximate:
                out.tune(vectors, ids, target_recall=target_recall, seed=seed, report=out.choice)
        out.choice.update(build_s=round(time.perf_counter() - started, 2), search_params=out.search_params)
        return out

    @staticmethod
    def _aligned_metadata(metadata: pd.DataFrame | None, ids: np.ndarray) -> pd.DataFrame | None:
        """Metadata rows given in vector order, with the ``id`` column set (or checked when present)."""
        if metadata is not None:
            metadata = metadata.reset_index(drop=True)
            if len(metadata) != len(ids):
                raise ValueError(f"metadata has {len(metadata)} rows but there are {len(ids)} vectors")
            if ID_COLUMN in metadata and not np.array_equal(metadata[ID_COLUMN].to_numpy(np.int64), ids):
                raise ValueError("metadata 'id' column does not match ids")
            metadata = metadata.assign(**{ID_COLUMN: ids})
        return metadata

    @staticmethod
    def _check_metadata(metadata: pd.DataFrame, ids: np.ndarray, where: str = "metadata") -> pd.DataFrame:
        if ID_COLUMN not in metadata:
            raise ValueError(f"{where} has no '{ID_COLUMN}' column")
        meta_ids = metadata[ID_COLUMN].to_numpy()
        if len(meta_ids) != len(ids) or len(np.unique(meta_ids)) != len(meta_ids) \
                or not np.array_equal(np.sort(meta_ids.astype(np.int64)), np.sort(ids)):
            raise ValueError(f"{where} does not match the index: {len(meta_ids)} metadata rows vs {len(ids)} vectors, "
                             f"{len(np.setxor1d(meta_ids.astype(np.int64), ids))} ids in only one of them")
        metadata = metadata.assign(**{ID_COLUMN: meta_ids.astype(np.int64)})
        return metadata.set_index(ID_COLUMN, drop=False).rename_axis(None)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        """Vectors in the index (removed ones not counted)."""
        return int(self._index.ntotal) - len(self._removed)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def ids(self) -> np.ndarray:
        """All ids in the index (int64, insertion order), removed ones left out."""
        stored = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return stored[~np.isin(stored, self._removed)] if len(self._removed) else stored

    @property
    def removed_ids(self) -> np.ndarray:
        """Ids removed but still stored (HNSW, re-ranked and on-disk indexes), until :meth:`compact`."""
        return self._removed.copy()

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying CPU ``IndexIDMap2``."""
        return self._index

    @property
    def inner_index(self) -> faiss.Index:
        return faiss.downcast_index(self._index.index)

    @property
    def is_approximate(self) -> bool:
        return not isinstance(self.inner_index, faiss.IndexFlat)

    @property
    def on_disk_lists(self) -> Path | None:
        """The memory-mapped inverted-lists file of an on-disk IVF index (``None`` for in-memory indexes)."""
        ivf = faiss.try_extract_index_ivf(self.inner_index)
        lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
        return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None

    def bytes_per_vector(self) -> float:
        """Serialised size per vector (codes + ids + graph / lists overhead; on-disk lists included)."""
        lists = self.on_disk_lists
        size = lists.stat().st_size if lists is not None else 0
        return (len(faiss.serialize_index(self._index)) + size) / max(1, self.ntotal)

    def __repr__(self) -> str:
        return (f"EmbeddingIndex(factory={self.factory!r}, dim={self.dim}, ntotal={self.ntotal}, "
                f"search_params={self.search_params!r})")

    # ------------------------------------------------------------------ mutation
    def _drop_caches(self) -> None:
        self._gpu_index = None
        ivf = faiss.try_extract_index_ivf(self.inner_index)
        if ivf is not None and ivf.direct_map.type != faiss.DirectMap.NoMap:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # array direct maps cannot follow removals

    def set_search_params(self, params: str) -> None:
        """Apply a FAISS ``ParameterSpace`` string such as ``"nprobe=32"`` or ``"efSearch=128"``."""
        if params:
            faiss.ParameterSpace().set_index_parameters(self._index, params)
        self.search_params = params
        self._gpu_index = None

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored (normalised; approximate for quantised indexes) vectors of ``ids``."""
        ivf = faiss.try_extract_index_ivf(self.inner_index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_batch(ids)

    # ------------------------------------------------------------------ search
    def _search_index(self) -> faiss.Index:
        want_gpu = self.device == "gpu" or (self.device == "auto" and gpu_available())
        # HNSW has no GPU implementation; on-disk lists would be copied whole to the GPU
        if not want_gpu or self.on_disk_lists is not None or isinstance(self.inner_index, faiss.IndexHNSW):
            return self._index
        if self._gpu_index is None:
            try:
                self._gpu_resources = getattr(self, "_gpu_resources", None) or faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
                if self.search_params:
                    faiss.GpuParameterSpace().set_index_parameters(self._gpu_index, self.search_params)
            except (RuntimeError, AttributeError) as err:
                if self.device == "gpu":
                    raise
                logger.warning("GPU clone failed (%s); searching on CPU", str(err).splitlines()[0])
                self.device = "cpu"
                return self._index
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int = 10, *, allowed_ids: Iterable[int] | np.ndarray | None = None,
               excluded_ids: Iterable[int] | np.ndarray | None = None,
               batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by cosine similarity, in batches.

        Args:
            queries: ``(nq, d)`` or ``(d,)`` float array (normalised here).
            k: Neighbours per query.
            allowed_ids: Restrict results to these ids (e.g. one patient's earlier studies).
            excluded_ids: Never return these ids (e.g. the query patient's own studies).
            batch_size: Queries per FAISS call.

        Returns:
            ``(scores, ids)``, both ``(nq, k)``, best first; ``ids == -1`` and ``scores == -inf`` where fewer than
            ``k`` (allowed) vectors exist. Filtered searches always return ``min(k, #allowed)`` results.
        """
        queries = normalize_rows(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, index has dim {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if allowed_ids is not None or excluded_ids is not None or len(self._removed):
            return self._search_filtered(queries, k, allowed_ids, excluded_ids, batch_size)
        index = self._search_index()
        scores, ids = [], []
        for start in range(0, len(queries), batch_size):
            s, i = index.search(queries[start:start + batch_size], k)
            scores.append(s)
            ids.append(i)
        return self._clean(np.concatenate(scores), np.concatenate(ids))

    @staticmethod
    def _clean(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = scores.astype(np.float32, copy=False)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64, copy=False)

    def _id_selector(self, ids: np.ndarray) -> faiss.IDSelector:
        """A selector of ``ids``. ``IndexIDMap2`` translates only top-level selectors to its inner positions; a
        re-ranking index passes nested parameters to its base index, so it gets the positions directly."""
        if isinstance(self.inner_index, faiss.IndexRefine):
            ids = np.flatnonzero(np.isin(faiss.vector_to_array(self._index.id_map), ids)).astype(np.int64)
        return faiss.IDSelectorBatch(ids)

    def _search_filtered(self, queries: np.ndarray, k: int, allowed_ids: Any, excluded_ids: Any,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        all_ids = self.ids  # removed ids are not in it
        excluded = np.unique(np.asarray(list(excluded_ids) if excluded_ids is not None else [], np.int64))
        excluded = np.union1d(excluded, self._removed)
        if allowed_ids is not None:
            allowed = np.asarray(list(allowed_ids) if not isinstance(allowed_ids, np.ndarray) else allowed_ids)
            allowed = np.setdiff1d(np.intersect1d(allowed.astype(np.int64), all_ids), excluded)
            # Small subsets (typical: one patient's priors) are searched exactly on their reconstructed vectors.
            if len(allowed) <= max(4096, k):
                return exact_top_k(queries, self.reconstruct(allowed), allowed, k)
            selectors = [self._id_selector(allowed)]
        else:
            allowed = None
            selectors = [self._id_selector(excluded)] if len(excluded) else []
            selectors = [faiss.IDSelectorNot(selectors[0]), *selectors] if selectors else []
        n_allowed = len(allowed) if allowed is not None else len(np.setdiff1d(all_ids, excluded))
        params_chain = _search_parameters(self.inner_index, selectors[0]) if selectors else [None]
        params = params_chain[0]  # params_chain and selectors keep the nested SWIG objects alive
        scores, ids = [], []
        for start in range(0, len(queries), batch_size):
            s, i = self._index.search(queries[start:start + batch_size], k, params=params)
            scores.append(s)
            ids.append(i)
        scores, ids = self._clean(np.concatenate(scores), np.concatenate(ids))
        # Approximate indexes can miss allowed vectors under a selective filter: redo those rows exactly.
        short = np.flatnonzero((ids >= 0).sum(axis=1) < min(k, n_allowed))
        if len(short):
            pool = allowed if allowed is not None else np.setdiff1d(all_ids, excluded)
            scores[short], ids[short] = exact_top_k(queries[short], self.reconstruct(pool), pool, k)
        return scores, ids

    # ------------------------------------------------------------------ tuning
    def tune(self, vectors: np.ndarray, ids: np.ndarray, target_recall: float = 0.95, k: int = 10,
             n_queries: int = 256, seed: int = 0, report: dict[str, Any] | None = None) -> str:
        """Set the cheapest nprobe / efSearch reaching ``target_recall`` (see :func:`tune_search_params`)."""
        return tune_search_params(self, vectors, ids, target_recall, k, n_queries, seed, report)

    # ------------------------------------------------------------------ persistence
    def header(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "dim": self.dim, "metric": "inner_product", "normalized": True,
                "factory": self.factory, "count": self.ntotal, "rvl_version": __version__,
                "model_fingerprint": self.model_fingerprint, "search_params": self.search_params,
                "faiss_version": faiss.__version__, "extra": self.extra, "choice": self.choice,
                "removed_count": len(self._removed), "on_disk": self.on_disk_lists is not None}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``metadata.parquet`` and ``index.json`` atomically into folder ``path`` (plus
        ``removed_ids.npy`` when ids are hidden, and ``index.ivfdata`` for on-disk lists)."""
        return atomic_write_dir(path, self.write_files)

    def write_files(self, folder: Path) -> None:
        """Write the index files into an existing (temporary) folder; :meth:`save` swaps it in atomically."""
        with on_disk_lists_in(self._index, folder):
            faiss.write_index(self._index, str(folder / INDEX_FILE))  # always the CPU master, never a GPU clone
        if len(self._removed):
            np.save(folder / REMOVED_FILE, self._removed)
        self.metadata.reset_index(drop=True).to_parquet(folder / METADATA_FILE, index=False)
        write_json(folder / HEADER_FILE, self.header())

    @classmethod
    def load(cls, path: str | os.PathLike, model_fingerprint: str | None = None, dim: int | None = None,
             device: str = "auto") -> "EmbeddingIndex":
        """Load an index folder, checking that it matches the expected model and dimension.

        Raises:
            IndexMismatchError: ``model_fingerprint`` or ``dim`` is given and differs from the index's.
            ValueError: The files disagree with each other (ids, counts, dims) or are not an rvl index.
        """
        folder = resolve_index_dir(path)
        header = read_json(folder / HEADER_FILE)
        if header.get("format_version") != FORMAT_VERSION or header.get("metric") != "inner_product":
            raise ValueError(f"{folder / HEADER_FILE}: not an rvl index header (format_version "
                             f"{header.get('format_version')!r}, metric {header.get('metric')!r})")
        if dim is not None and int(header["dim"]) != int(dim):
            raise IndexMismatchError(f"index {path} holds {header['dim']}-d embeddings but the model produces {dim}-d "
                                     "ones; rebuild it with `rvl index build` for this model")
        stored_fp = header.get("model_fingerprint")
        if model_fingerprint is not None and stored_fp != model_fingerprint:
            raise IndexMismatchError(f"index {path} was built by a different model (fingerprint {stored_fp}, this "
                                     f"model {model_fingerprint}); rebuild it with `rvl index build` for this model")
        if header.get("on_disk") and not (folder / ON_DISK_LISTS_FILE).is_file():
            raise FileNotFoundError(f"{folder}: index.json says the inverted lists are on disk but "
                                    f"{ON_DISK_LISTS_FILE} is missing")
        # on-disk lists are memory-mapped from this folder, wherever the index was written
        with faiss_stdout_silenced():
            index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{folder / INDEX_FILE}: expected an IDMap2 index, found {type(index).__name__}")
        n_removed = int(header.get("removed_count", 0))
        removed = np.load(folder / REMOVED_FILE) if n_removed else np.zeros(0, np.int64)
        stored = faiss.vector_to_array(index.id_map).astype(np.int64)
        if index.d != int(header["dim"]) or index.ntotal != int(header["count"]) + n_removed \
                or len(removed) != n_removed or not np.isin(removed, stored).all():
            raise ValueError(f"{folder}: index.faiss has dim {index.d} / {index.ntotal} vectors but index.json says "
                             f"dim {header['dim']} / {header['count']} (+ {n_removed} removed, {len(removed)} in "
                             f"{REMOVED_FILE})")
        metadata = pd.read_parquet(folder / METADATA_FILE)
        try:
            cls._check_metadata(metadata, stored[~np.isin(stored, removed)], where=str(folder / METADATA_FILE))
        except ValueError as err:
            raise ValueError(f"{err}; the index folder is inconsistent, rebuild it") from None
        return cls(index, header["factory"], metadata, stored_fp, header.get("search_params", ""),
                   header.get("extra"), device, removed_ids=removed, choice=header.get("choice"))
