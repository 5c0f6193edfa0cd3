"""rvl.nlp: radiology report sections and a CheXpert-14 labeler (mentions, negation, uncertainty) on spaCy.

    from rvl.nlp import extract_sections, label_reports
    extract_sections(report)            # {"findings": ..., "impression": ..., "indication": ..., ...}
    label_reports(reports)              # DataFrame: the 14 CheXpert columns, 1.0 / 0.0 / -1.0 / NaN

Importing this package is light (no spaCy until a labeler is built; never open_clip/transformers/datasets).
"""
from __future__ import annotations

from rvl._lazy import lazy_attributes

from .sections import SECTION_KEYS, extract_sections, select_text

__all__ = ["extract_sections", "select_text", "SECTION_KEYS", "label_reports", "iter_labels", "build_labeler_pipeline",
           "aggregate_assertions", "validate_report"]

_LAZY = {
    "label_reports": ".labeler", "iter_labels": ".labeler", "build_labeler_pipeline": ".labeler",
    "validate_report": ".labeler", "aggregate_assertions": ".aggregate",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
