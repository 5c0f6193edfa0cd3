"""Fine-tuning augmentations: CutMix with area-mixed multi-hot targets, and Cut&Remain on finding boxes.

CutMix (Yun et al. 2019) pastes a random box of the partner study (the batch reversed, timm's batch mode) into every
view and mixes the labels by the pasted area. The box and the area-corrected lambda come from timm
(``timm.data.mixup.cutmix_bbox_and_lam``) and the multi-hot mixing is timm's ``mixup_target(..., multi_label=True)``;
timm's ``Mixup`` class itself is not used because it cannot carry the label mask (a label ignored in either study of
a pair stays ignored in the mix) and draws from numpy's global stream (here one seed per step: exact resume).

Cut&Remain ("Look at here: utilizing supervision to attend subtle key regions", Park et al.): for a fraction ``P`` of
the training images that carry finding boxes, keep the annotated regions and blank the rest (to the zero of the
padded frame), so that the classifier is pushed to the small region that holds the finding. An image qualifies only
when every positive chosen label of its study has a box on that image: cutting away an unboxed finding would leave a
positive label on an image that no longer shows it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import torch

from rvl.data.dataset import StudyDataset

__all__ = ["StudyCutMix", "CutRemainStudies", "remain_boxes"]


class StudyCutMix:
    """CutMix over a batch of studies ``[B, V, 3, H, W]`` with multi-hot targets and a label mask.

    Args:
        alpha: Beta(alpha, alpha) of the kept area (timm's ``--cutmix``); 0 switches CutMix off.
        prob: Chance that a batch is mixed.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0):
        if alpha < 0 or not 0 <= prob <= 1:
            raise ValueError(f"cutmix alpha must be >= 0 and prob in [0, 1], got {alpha}, {prob}")
        self.alpha, self.prob = float(alpha), float(prob)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Mix in place; returns (images, targets, weights, lam), lam the share of each study's own pixels."""
        from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

        if self.alpha <= 0 or len(images) < 2:
            return images, targets, weights, 1.0
        state = np.random.get_state()  # timm draws the box centre from numpy's global stream
        try:
            np.random.seed(int(seed) % (2 ** 32))
            if np.random.rand() >= self.prob:
                return images, targets, weights, 1.0
            lam = float(np.random.beta(self.alpha, self.alpha))
            (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(images.shape, lam, correct_lam=True)
        finally:
            np.random.set_state(state)
        images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        mixed = mixup_target(targets, targets.shape[1], lam, smoothing=0.0, multi_label=True)
        return images, mixed.to(targets.dtype), weights * weights.flip(0), float(lam)


def remain_boxes(array: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """Copy of a square uint8 image with everything outside the normalised ``[x0, y0, x1, y1]`` boxes set to 0
    (pixels a box touches are kept)."""
    height, width = array.shape
    keep = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        r0, r1 = max(0, math.floor(y0 * height)), min(height, math.ceil(y1 * height))
        c0, c1 = max(0, math.floor(x0 * width)), min(width, math.ceil(x1 * width))
        keep[r0:r1, c0:c1] = True
    return np.where(keep, array, 0).astype(np.uint8)


class CutRemainStudies(StudyDataset):
    """A :class:`StudyDataset` that applies Cut&Remain to a fraction ``cut_remain`` of its boxed images.

    Args:
        *args: As :class:`StudyDataset`.
        cut_remain: Chance that a qualifying image is cut (seeded by (seed, epoch, study, view): exact resume).
        labels: The labels being trained; an image qualifies when each of its study's positive ones is boxed on it.
        **kwargs: As :class:`StudyDataset`.
    """

    def __init__(self, *args: Any, cut_remain: float = 0.0, labels: Sequence[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0.0 <= cut_remain <= 1.0:
            raise ValueError(f"--cut-remain must be in [0, 1], got {cut_remain}")
        if cut_remain > 0 and "finding_boxes" not in self.frame:
            raise ValueError(f"{self.source}: --cut-remain needs a finding_boxes column (none in this data)")
        self.cut_remain, self.labels = float(cut_remain), list(labels)
        self.cut_count = 0

    def _boxes_to_keep(self, i: int, j: int) -> list[list[float]]:
        """Boxes of view ``j`` of study ``i`` if the image qualifies (see the class docstring), else []."""
        raw = self.frame["finding_boxes"].iloc[i]
        if not isinstance(raw, str) or not raw.strip():
            return []
        per_view = json.loads(raw)
        boxes = [b for b in (per_view[j] if j < len(per_view) else []) or [] if b.get("box") is not None]
        if not boxes:
            return []
        labels = self.frame.iloc[i][self.labels].to_numpy(dtype=np.float64, na_value=np.nan)
        positive = {name for name, value in zip(self.labels, labels) if value == 1.0}
        if not positive <= {b.get("label") for b in boxes}:
            return []
        return [list(b["box"]) for b in boxes]

    def _study_images(self, i: int, chosen: list[int]) -> list[np.ndarray | None]:
        arrays = super()._study_images(i, chosen)
        if self.cut_remain <= 0:
            return arrays
        out = []
        for j, array in zip(chosen, arrays):
            draw = np.random.default_rng((self.seed, self.epoch, i, j, 77)).random()
            boxes = self._boxes_to_keep(i, j) if array is not None and draw < self.cut_remain else []
            if boxes and not self.is_cache:  # manifest boxes are in the original frame; the array is the square
                from rvl.data.io import box_to_square, read_image

                height, width = read_image(self._paths[i][j]).shape
                boxes = [box_to_square(b, height, width, self.size) for b in boxes]
            if boxes:
                array = remain_boxes(array, boxes)
                self.cut_count += 1
            out.append(array)
        return out
