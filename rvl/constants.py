"""Names shared by every part of rvl (pure Python: safe to import from ``rvl.nlp``)."""
from __future__ import annotations

# Column names and order exactly as the CheXpert labeler writes them.
CHEXPERT_LABELS: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0

# View types the study encoder knows; anything else maps to OTHER.
VIEW_TYPES: list[str] = ["PA", "AP", "LATERAL", "LL", "OTHER"]
FRONTAL_VIEWS = ("PA", "AP")
_VIEW_ALIASES = {
    "PA": "PA", "POSTERO_ANTERIOR": "PA", "AP": "AP", "AP AXIAL": "AP", "AP SUPINE": "AP", "ANTERO_POSTERIOR": "AP",
    "LATERAL": "LATERAL", "LAT": "LATERAL", "L": "LATERAL", "RL": "LATERAL", "RLAT": "LATERAL",
    "LL": "LL", "LEFT LATERAL": "LL", "LLAT": "LL",
}

REPORT_SECTIONS: list[str] = ["findings", "impression", "indication", "comparison", "technique", "recommendation", "other"]


def normalize_view(view: object) -> str:
    """Map a DICOM ``ViewPosition`` / dataset view string to one of ``VIEW_TYPES``."""
    if not isinstance(view, str):
        return "OTHER"
    return _VIEW_ALIASES.get(view.strip().upper().replace("-", " ").replace("_", " "), _VIEW_ALIASES.get(
        view.strip().upper(), "OTHER"))


def view_type_id(view: object) -> int:
    """Integer id of a view string in ``VIEW_TYPES`` (used by the model's view-type embedding)."""
    return VIEW_TYPES.index(normalize_view(view))
