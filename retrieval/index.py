"""``EmbeddingIndex``: a FAISS inner-product index over L2-normalised embeddings, with ids, metadata and a header.

Vectors are L2-normalised on the way in (build, add and queries), so inner product = cosine similarity. The FAISS
index is always wrapped in ``IndexIDMap2`` (``"IDMap2,<factory>"``) so that ids are the caller's int64 ids and vectors
can be reconstructed by id (needed for exact search inside small filtered subsets). The CPU index is the master copy;
when faiss-gpu and a GPU are present a GPU clone serves unfiltered searches and is dropped on every change.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np
import pandas as pd

from rvl.version import __version__

from .ops import _as_ids, _search_parameters, exact_top_k, normalize_rows, tune_search_params
from .store import HEADER_FILE, INDEX_FILE, METADATA_FILE, atomic_write_dir, read_json, resolve_index_dir, write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FLAT_MAX_VECTORS = 50_000  # exact search below this: ~10 ms/query on 1 core at d=512, and no training needed
ID_COLUMN = "id"


class IndexMismatchError(ValueError):
    """The index on disk was built for different embeddings (model fingerprint or dimension) than requested."""


def default_factory(n_vectors: int, dim: int) -> str:
    """FAISS factory string for a collection size (without the ``IDMap2`` wrapper).

    ``Flat`` (exact) for small collections; above :data:`FLAT_MAX_VECTORS` an inverted file with ~2·sqrt(n) lists,
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


class EmbeddingIndex:
    """Inner-product FAISS index over normalised embeddings with int64 ids, a metadata table and a JSON header.

    Args:
        index: A FAISS ``IndexIDMap2`` with ``METRIC_INNER_PRODUCT``.
        factory: The factory string of the wrapped index (e.g. ``"Flat"``, ``"IVF1024,Flat"``).
        metadata: One row per id, with an ``id`` column; ``None`` for ids only.
        model_fingerprint: Identifies the embedding model; ``load`` refuses a different one.
        search_params: FAISS ``ParameterSpace`` string applied before searching (e.g. ``"nprobe=16"``).
        extra: Free-form JSON-able info stored in ``index.json`` (e.g. model dir, embedding kind).
        device: ``"auto"`` (GPU when faiss-gpu sees one), ``"cpu"`` or ``"gpu"``.
    """

    def __init__(self, index: faiss.Index, factory: str, metadata: pd.DataFrame | None = None,
                 model_fingerprint: str | None = None, search_params: str = "", extra: dict[str, Any] | None = None,
                 device: str = "auto") -> None:
        if not isinstance(index, faiss.IndexIDMap2):
            raise TypeError(f"expected a faiss.IndexIDMap2, got {type(index).__name__}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("EmbeddingIndex needs an inner-product index (METRIC_INNER_PRODUCT)")
        self._index = index
        self.factory = factory
        self.model_fingerprint = model_fingerprint
        self.extra = dict(extra or {})
        self.device = device
        self._gpu_index: faiss.Index | None = None
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
              seed: int = 0) -> "EmbeddingIndex":
        """Build an index from float vectors (normalised here) and unique int64 ids.

        Args:
            vectors: ``(n, d)`` float array.
            ids: ``(n,)`` unique non-negative int64 ids.
            factory: FAISS factory string without ``IDMap2`` (``None`` = :func:`default_factory` for ``n``).
            metadata: Optional table aligned with ``vectors`` (one row each); an ``id`` column is added or checked.
            model_fingerprint: Identifier of the embedding model (stored, checked by ``load``).
            target_recall: Approximate indexes tune nprobe / efSearch to reach this recall@10 on a sample.
            extra: Free-form JSON-able info for the header.
            device: ``"auto"``, ``"cpu"`` or ``"gpu"``.
            seed: Seed of the training / tuning samples.
        """
        vectors = normalize_rows(vectors)
        ids = _as_ids(ids, len(vectors))
        factory = factory or default_factory(len(vectors), vectors.shape[1])
        try:
            index = faiss.index_factory(vectors.shape[1], f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {str(err).splitlines()[0]}") from err
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None and len(vectors) < ivf.nlist:
                raise ValueError(f"factory {factory!r} has {ivf.nlist} inverted lists but only {len(vectors)} vectors "
                                 "to train them; use fewer lists or 'Flat'")
            # 64 points per list is plenty for k-means (faiss warns below 39) and bounds the training time.
            n_train = min(len(vectors), 64 * ivf.nlist if ivf is not None else 100_000)
            logger.info("training %s on %d of %d vectors", factory, n_train, len(vectors))
            index.train(vectors[np.sort(rng.choice(len(vectors), n_train, replace=False))])
        index.add_with_ids(vectors, ids)
        if metadata is not None:
            metadata = metadata.reset_index(drop=True)
            if len(metadata) != len(ids):
                raise ValueError(f"metadata has {len(metadata)} rows but there are {len(ids)} vectors")
            if ID_COLUMN in metadata and not np.array_equal(metadata[ID_COLUMN].to_numpy(np.int64), ids):
                raise ValueError("metadata 'id' column does not match ids")
            metadata = metadata.assign(**{ID_COLUMN: ids})
        out = cls(index, factory, metadata, model_fingerprint, extra=extra, device=device)
        if out.is_approximate:
            out.tune(vectors, ids, target_recall=target_recall, seed=seed)
        return out

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
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def ids(self) -> np.ndarray:
        """All ids in the index (int64, insertion order)."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

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

    def bytes_per_vector(self) -> float:
        """Serialised size per vector (codes + ids + graph / lists overhead)."""
        return len(faiss.serialize_index(self._index)) / max(1, self.ntotal)

    def __repr__(self) -> str:
        return (f"EmbeddingIndex(factory={self.factory!r}, dim={self.dim}, ntotal={self.ntotal}, "
                f"search_params={self.search_params!r})")

    # ------------------------------------------------------------------ mutation
    def add(self, vectors: np.ndarray, ids: np.ndarray, metadata: pd.DataFrame | None = None) -> None:
        """Add vectors with new unique ids (and their metadata rows when the index carries metadata columns)."""
        vectors = normalize_rows(vectors)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dim {vectors.shape[1]}, index has dim {self.dim}")
        ids = _as_ids(ids, len(vectors))
        clash = np.intersect1d(ids, self.ids)
        if len(clash):
            raise ValueError(f"{len(clash)} ids already in the index (e.g. {clash[:3].tolist()}); remove them first")
        extra_columns = [c for c in self.metadata.columns if c != ID_COLUMN]
        if metadata is None:
            if extra_columns:
                raise ValueError(f"the index carries metadata columns {extra_columns[:5]}; pass metadata rows too")
            metadata = pd.DataFrame({ID_COLUMN: ids})
        elif len(metadata) != len(ids):
            raise ValueError(f"metadata has {len(metadata)} rows but there are {len(ids)} vectors")
        new_rows = metadata.reset_index(drop=True).assign(**{ID_COLUMN: ids})
        self._index.add_with_ids(vectors, ids)
        self._drop_caches()
        combined = pd.concat([self.metadata.reset_index(drop=True), new_rows], ignore_index=True)
        self.metadata = self._check_metadata(combined, self.ids)

    def remove_ids(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed.

        HNSW cannot delete in place, so for HNSW the index is rebuilt from the remaining (reconstructed) vectors.
        """
        ids = np.intersect1d(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64), self.ids)
        if len(ids) == 0:
            return 0
        self._drop_caches()
        if isinstance(self.inner_index, faiss.IndexHNSW):
            keep = np.setdiff1d(self.ids, ids)
            vectors = self.reconstruct(keep)
            index = faiss.index_factory(self.dim, f"IDMap2,{self.factory}", faiss.METRIC_INNER_PRODUCT)
            index.add_with_ids(vectors, keep)
            self._index = index
            self.set_search_params(self.search_params)
            removed = len(ids)
        else:
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        self.metadata = self.metadata.drop(index=ids)
        return removed

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
        if not want_gpu or isinstance(self.inner_index, faiss.IndexHNSW):  # HNSW has no GPU implementation
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
        if allowed_ids is not None or excluded_ids is not None:
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

    def _search_filtered(self, queries: np.ndarray, k: int, allowed_ids: Any, excluded_ids: Any,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        all_ids = self.ids
        excluded = np.unique(np.asarray(list(excluded_ids) if excluded_ids is not None else [], np.int64))
        if allowed_ids is not None:
            allowed = np.asarray(list(allowed_ids) if not isinstance(allowed_ids, np.ndarray) else allowed_ids)
            allowed = np.setdiff1d(np.intersect1d(allowed.astype(np.int64), all_ids), excluded)
            # Small subsets (typical: one patient's priors) are searched exactly on their reconstructed vectors.
            if len(allowed) <= max(4096, k):
                return exact_top_k(queries, self.reconstruct(allowed), allowed, k)
            selector = faiss.IDSelectorBatch(allowed)
        else:
            allowed = None
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)) if len(excluded) else None
        n_allowed = len(allowed) if allowed is not None else len(np.setdiff1d(all_ids, excluded))
        params = _search_parameters(self.inner_index, selector) if selector is not None else None
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
             n_queries: int = 256, seed: int = 0) -> str:
        """Set the cheapest nprobe / efSearch reaching ``target_recall`` (see :func:`tune_search_params`)."""
        return tune_search_params(self, vectors, ids, target_recall, k, n_queries, seed)

    # ------------------------------------------------------------------ persistence
    def header(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "dim": self.dim, "metric": "inner_product", "normalized": True,
                "factory": self.factory, "count": self.ntotal, "rvl_version": __version__,
                "model_fingerprint": self.model_fingerprint, "search_params": self.search_params,
                "faiss_version": faiss.__version__, "extra": self.extra}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``metadata.parquet`` and ``index.json`` atomically into folder ``path``."""
        def write(folder: Path) -> None:
            faiss.write_index(self._index, str(folder / INDEX_FILE))  # always the CPU master, never a GPU clone
            self.metadata.reset_index(drop=True).to_parquet(folder / METADATA_FILE, index=False)
            write_json(folder / HEADER_FILE, self.header())

        return atomic_write_dir(path, write)

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
        index = faiss.read_index(str(folder / INDEX_FILE))
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{folder / INDEX_FILE}: expected an IDMap2 index, found {type(index).__name__}")
        if index.d != int(header["dim"]) or index.ntotal != int(header["count"]):
            raise ValueError(f"{folder}: index.faiss has dim {index.d} / {index.ntotal} vectors but index.json says "
                             f"dim {header['dim']} / {header['count']}")
        metadata = pd.read_parquet(folder / METADATA_FILE)
        try:
            cls._check_metadata(metadata, faiss.vector_to_array(index.id_map).astype(np.int64),
                                where=str(folder / METADATA_FILE))
        except ValueError as err:
            raise ValueError(f"{err}; the index folder is inconsistent, rebuild it") from None
        return cls(index, header["factory"], metadata, stored_fp, header.get("search_params", ""),
                   header.get("extra"), device)
