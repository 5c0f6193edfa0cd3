"""rvl: report-supervised multi-view vision-language pretraining for radiographs.

The package is lazy (PEP 562): ``import rvl`` and ``import rvl.nlp`` do not import torch, open_clip, transformers,
accelerate, faiss or datasets. Attributes listed in ``_LAZY`` are imported on first access.
"""
from __future__ import annotations

from ._lazy import lazy_attributes
from .version import __version__

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "CHEXPERT_LABELS": "rvl.constants",
    "VIEW_TYPES": "rvl.constants",
    "read_image": "rvl.data",
    "ImageReadError": "rvl.data",
    "generate_phantoms": "rvl.phantoms",
    "read_manifest": "rvl.data",
    "StudyDataset": "rvl.data",
    "create_model": "rvl.model",
    "from_pretrained": "rvl.model",
    "EmbeddingIndex": "rvl.retrieval",
    "ZeroShotClassifier": "rvl.zeroshot",
    "evaluate_model": "rvl.evaluate",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
