"""rvl.retrieval: FAISS indexes over study / report embeddings with metadata, filters and crash-safe persistence.

Lazy (PEP 562) so that ``rvl --help`` does not pay for faiss / pandas; the index code imports faiss, numpy and pandas
only (never torch / open_clip; the model-side helpers in ``rvl.retrieval.embed`` import torch inside functions).
"""
from __future__ import annotations

import logging

from rvl._lazy import lazy_attributes

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # faiss logs its CPU-feature probing at INFO

_LAZY: dict[str, str] = {
    "EmbeddingIndex": "rvl.retrieval.index",
    "IndexMismatchError": "rvl.retrieval.index",
    "default_factory": "rvl.retrieval.index",
    "exact_top_k": "rvl.retrieval.index",
    "gpu_available": "rvl.retrieval.index",
    "filter_ids": "rvl.retrieval.filters",
    "results_frame": "rvl.retrieval.filters",
    "search_filtered": "rvl.retrieval.filters",
    "similar_prior_studies": "rvl.retrieval.filters",
    "model_fingerprint": "rvl.retrieval.embed",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
