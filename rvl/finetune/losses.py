"""Training targets and the multi-label losses of ``rvl finetune``.

Targets: manifest labels are 1 positive, 0 negative, -1 uncertain and NaN blank (not mentioned). The uncertain policy
follows CheXpert's U-Ignore / U-Zeros / U-Ones; blanks are negatives unless ``blank="ignore"``. An ignored entry gets
weight 0 in a masked loss (it does not move the classifier either way).

Losses, each on logits ``(B, L)``, targets in [0, 1] (soft after CutMix) and a 0/1 weight mask ``(B, L)``, averaged
over the entries with weight 1:

- ``bce``: binary cross-entropy with optional per-label positive weights (``pos_weight="auto"``: negatives /
  positives of each label in the training subset, the usual answer to the rare-finding imbalance of PadChest-like
  data);
- ``focal``: ``torchvision.ops.sigmoid_focal_loss`` (RetinaNet's alpha 0.25, gamma 2);
- ``asl``: asymmetric loss (Ridnik et al. 2021; gamma- 4, gamma+ 1, probability margin 0.05). timm ships it
  (``timm.loss.AsymmetricLossMultiLabel``) but sums over every entry, with no way to leave ignored labels out, so it
  is written here with the same defaults and formula plus the mask.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "UNCERTAIN_POLICIES", "label_targets", "positive_weights", "masked_loss"]

LOSSES = ("bce", "asl", "focal")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")


def label_targets(values: np.ndarray, uncertain: str = "ignore", blank: str = "negative"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Manifest label values ``(N, L)`` (1, 0, -1, NaN) -> (targets in {0, 1}, weights in {0, 1}), float32.

    Args:
        values: Label columns as floats.
        uncertain: ``ignore`` (weight 0), ``zeros`` (negative) or ``ones`` (positive) for -1.
        blank: ``negative`` (a finding the report does not mention is absent) or ``ignore`` (weight 0) for NaN.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if blank not in ("negative", "ignore"):
        raise ValueError(f"blank policy must be 'negative' or 'ignore', got {blank!r}")
    values = np.asarray(values, dtype=np.float64)
    blank_mask, uncertain_mask = np.isnan(values), values == -1.0
    unknown = ~(blank_mask | uncertain_mask | (values == 0.0) | (values == 1.0))
    if unknown.any():
        row, col = np.argwhere(unknown)[0]
        raise ValueError(f"label value {values[row, col]!r} (row {row}, column {col}) is not 1, 0, -1 or blank")
    targets = np.where(values == 1.0, 1.0, 0.0)
    weights = np.ones_like(targets)
    if uncertain == "ones":
        targets[uncertain_mask] = 1.0
    elif uncertain == "ignore":
        weights[uncertain_mask] = 0.0
    if blank == "ignore":
        weights[blank_mask] = 0.0
    return targets.astype(np.float32), weights.astype(np.float32)


def positive_weights(targets: np.ndarray, weights: np.ndarray, max_weight: float = 100.0) -> np.ndarray:
    """Per-label BCE ``pos_weight``: counted negatives / positives among the weighted entries (1 where a label has
    no positive or no negative; capped at ``max_weight`` so that one positive in thousands cannot blow up a step)."""
    pos = ((targets > 0.5) & (weights > 0)).sum(axis=0).astype(np.float64)
    neg = ((targets <= 0.5) & (weights > 0)).sum(axis=0).astype(np.float64)
    out = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1.0), 1.0)
    return np.clip(out, 1.0 / max_weight, max_weight).astype(np.float32)


def _asymmetric(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Element-wise asymmetric loss (timm ``AsymmetricLossMultiLabel``'s formula, without the sum)."""
    prob = torch.sigmoid(logits)
    prob_neg = (1 - prob + clip).clamp(max=1) if clip > 0 else 1 - prob
    loss = targets * torch.log(prob.clamp(min=eps)) + (1 - targets) * torch.log(prob_neg.clamp(min=eps))
    with torch.no_grad():  # the focusing weight is a constant of the step, as in the paper's reference code
        pt = prob * targets + prob_neg * (1 - targets)
        focus = torch.pow(1 - pt, gamma_pos * targets + gamma_neg * (1 - targets))
    return -loss * focus


def masked_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the entries with weight 1 (0 when there is none).

    Args:
        kind: ``bce``, ``asl`` or ``focal``.
        logits: ``(B, L)`` raw scores.
        targets: ``(B, L)`` in [0, 1].
        weights: ``(B, L)`` 0/1 (0 = ignored label of that study).
        pos_weight: ``(L,)`` positive weights (``bce`` only).
    """
    logits, targets, weights = logits.float(), targets.float(), weights.float()
    if kind == "bce":
        per_entry = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    elif kind == "focal":
        from torchvision.ops import sigmoid_focal_loss

        per_entry = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    elif kind == "asl":
        per_entry = _asymmetric(logits, targets)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    return (per_entry * weights).sum() / weights.sum().clamp_min(1.0)


def label_indices(labels: Sequence[str], known: Sequence[str]) -> list[int]:
    """Positions of ``labels`` in ``known``, with a clear error for an unknown name."""
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; choose from: {', '.join(known)}")
    return [list(known).index(label) for label in labels]
