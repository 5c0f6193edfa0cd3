"""rvl: report-supervised multi-view vision-language pretraining for radiographs.

The package is lazy (PEP 562): ``import rvl`` and ``import rvl.nlp`` do not import torch, open_clip, transformers,
accelerate, faiss or datasets. Attributes listed in ``_LAZY`` are imported on first access.
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "CHEXPERT_LABELS": "rvl.constants",
    "VIEW_TYPES": "rvl.constants",
    "read_image": "rvl.data",
    "ImageReadError": "rvl.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rvl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
