"""Label-efficient transfer of an rvl encoder (``rvl finetune``): REFERS's 1 / 10 / 100 % label protocol by patient,
linear probe and full fine-tuning, CutMix and Cut&Remain, imbalance-aware losses, AUCs with CIs, CAM explanations.

Light on import: names are loaded from their modules on first use.
"""
from __future__ import annotations

from rvl._lazy import lazy_attributes

_LAZY: dict[str, str] = {
    "run_grid": "rvl.finetune.grid",
    "run_name": "rvl.finetune.grid",
    "draw_patient_subset": "rvl.finetune.subsets",
    "FinetuneSettings": "rvl.finetune.trainer",
    "StudyClassifier": "rvl.finetune.classifier",
    "resolve_init": "rvl.finetune.classifier",
    "masked_loss": "rvl.finetune.losses",
    "label_targets": "rvl.finetune.losses",
    "StudyCutMix": "rvl.finetune.augment",
    "CutRemainStudies": "rvl.finetune.augment",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
