"""The part of :class:`rvl.retrieval.EmbeddingIndex` that changes its contents: add (in batches), remove, compact.

Flat and in-memory IVF indexes delete in place. HNSW graphs, re-ranked (``RFlat``) and on-disk indexes cannot, so a
removed id is kept in a sorted "removed" set that every search excludes with a FAISS ``IDSelector`` (saved with the
index as ``removed_ids.npy``) until :meth:`IndexEditing.compact` rebuilds without it.
"""
from __future__ import annotations

import uuid
from typing import Iterable

import faiss
import numpy as np
import pandas as pd

from .ops import _as_ids, copy_ivf_without, faiss_stdout_silenced, normalize_rows, remove_from_ivf
from .store import ON_DISK_LISTS_FILE

ID_COLUMN = "id"


class IndexEditing:
    """Mixin of :class:`rvl.retrieval.EmbeddingIndex` (uses its ``_index``, ``_removed``, ``metadata`` and helpers)."""

    def add(self, vectors: np.ndarray, ids: np.ndarray, metadata: pd.DataFrame | None = None) -> None:
        """Add vectors with new unique ids (and their metadata rows when the index carries metadata columns)."""
        self.add_batches([(vectors, ids, metadata)])

    def add_batches(self, batches: Iterable[tuple]) -> int:
        """Add ``(vectors, ids)`` or ``(vectors, ids, metadata)`` batches one at a time; returns the vectors added.

        Only one batch of vectors is in memory at a time (e.g. :func:`rvl.retrieval.archive.iter_embedding_batches`
        over a memory-mapped ``.npy``); metadata rows are joined once at the end, also when a batch fails, so the
        index and its metadata always agree.
        """
        if self.on_disk_lists is not None:
            raise ValueError("this index keeps its inverted lists on disk (read-only); build a new one with "
                             "rvl.retrieval.archive.build_on_disk_index to add vectors")
        extra_columns = [c for c in self.metadata.columns if c != ID_COLUMN]
        known = np.sort(self.ids)
        new_rows: list[pd.DataFrame] = []
        try:
            for batch in batches:
                vectors, ids, metadata = (*batch, None)[:3]
                vectors = normalize_rows(vectors)
                if vectors.shape[1] != self.dim:
                    raise ValueError(f"vectors have dim {vectors.shape[1]}, index has dim {self.dim}")
                ids = _as_ids(ids, len(vectors))
                clash = ids[np.isin(ids, known)]
                if len(clash):
                    raise ValueError(f"{len(clash)} ids already in the index (e.g. {clash[:3].tolist()}); "
                                     "remove them first")
                if metadata is None:
                    if extra_columns:
                        raise ValueError(f"the index carries metadata columns {extra_columns[:5]}; pass metadata "
                                         "rows too")
                    metadata = pd.DataFrame({ID_COLUMN: ids})
                elif len(metadata) != len(ids):
                    raise ValueError(f"metadata has {len(metadata)} rows but there are {len(ids)} vectors")
                if len(self._removed) and np.isin(ids, self._removed).any():
                    self.compact()  # a removed id comes back: its old vector must go first
                self._drop_caches()
                self._index.add_with_ids(vectors, ids)
                known = np.union1d(known, ids)
                new_rows.append(metadata.reset_index(drop=True).assign(**{ID_COLUMN: ids}))
        finally:
            if new_rows:
                combined = pd.concat([self.metadata.reset_index(drop=True), *new_rows], ignore_index=True)
                self.metadata = self._check_metadata(combined, self.ids)
        return int(sum(len(rows) for rows in new_rows))

    def _removes_in_place(self) -> bool:
        """Flat and in-memory IVF indexes delete in place; HNSW graphs, re-ranked and on-disk indexes cannot."""
        inner = self.inner_index
        if isinstance(inner, faiss.IndexFlat):
            return True
        ivf = faiss.try_extract_index_ivf(inner)
        return (ivf is not None and not isinstance(inner, faiss.IndexRefine)
                and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists))

    def remove_ids(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed. A removed id is never returned.

        Flat and IVF indexes delete in place. HNSW graphs, re-ranked (``RFlat``) and on-disk indexes keep the vectors
        but hide the ids at search time (an ``IDSelector``; saved with the index in ``removed_ids.npy``) until
        :meth:`compact` or the next rebuild.
        """
        ids = np.intersect1d(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64), self.ids)
        if len(ids) == 0:
            return 0
        self._drop_caches()
        if isinstance(self.inner_index, faiss.IndexFlat):
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        elif self._removes_in_place():
            removed = remove_from_ivf(self._index, ids)
        else:
            self._removed = np.union1d(self._removed, ids)
            removed = len(ids)
        self.metadata = self.metadata.drop(index=ids)
        return removed

    def compact(self) -> int:
        """Drop the vectors of removed ids for good (rebuilds HNSW graphs); returns how many were dropped.

        The trained parts (coarse quantiser, codebooks) are kept; the remaining vectors are reconstructed and added
        again. On-disk lists are copied without the removed entries into a new file beside the old one, which
        :meth:`save` then puts in the index folder.
        """
        if len(self._removed) == 0:
            return 0
        dropped = len(self._removed)
        lists = self.on_disk_lists
        if lists is not None:  # new lists beside the old ones; save() puts them in the folder as index.ivfdata
            target = lists.with_name(f"{ON_DISK_LISTS_FILE}.compacted-{uuid.uuid4().hex[:10]}")
            with faiss_stdout_silenced():
                self._index = copy_ivf_without(self._index, self._removed, target)
            self._removed = np.zeros(0, np.int64)
            self.set_search_params(self.search_params)
            return dropped
        live = self.ids
        vectors = self.reconstruct(live)
        inner = faiss.clone_index(self.inner_index)
        inner.reset()
        index = faiss.IndexIDMap2(inner)
        inner.this.disown()
        index.own_fields = True
        index.add_with_ids(vectors, live)
        self._index, self._removed = index, np.zeros(0, np.int64)
        self.set_search_params(self.search_params)
        return dropped
