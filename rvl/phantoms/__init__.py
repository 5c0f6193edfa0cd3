"""Synthetic chest-radiograph studies with known ground truth: the built-in dataset of rvl (``rvl phantoms``).

``generate_phantoms(out_dir, n_studies, ...)`` writes images (PNG and/or DICOM), a study manifest (Parquet + CSV) with
free-text reports, CheXpert-14 labels and per-view finding boxes, and optionally a preview contact sheet.
"""
from __future__ import annotations

from typing import Any

__all__ = ["generate_phantoms"]


def __getattr__(name: str) -> Any:
    if name == "generate_phantoms":
        from .generator import generate_phantoms

        return generate_phantoms
    raise AttributeError(f"module 'rvl.phantoms' has no attribute {name!r}")
