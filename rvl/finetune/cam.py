"""Class-activation maps of a fine-tuned classifier: overlays for test studies and the pointing game on boxes.

CNN towers whose cells average to the view embedding (``encoder.additive_patches``, the timm ResNet of rvl-demo):
the CAM of label ``c`` is each cell's unnormalised embedding dotted with the head's weight row ``c``, its exact share
of the view's logit (Zhou et al. 2016, as ChestX-ray8 and CheXNet draw them). Open_clip ViT towers: Grad-CAM on the
tokens entering the last transformer block (the patch tokens after it no longer reach the class token), gradients
of the label's logit for the view alone.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["class_activation_maps", "pointing_game", "write_overlays"]

logger = logging.getLogger(__name__)


def _single_view_logits(classifier: Any, images: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, L)`` of each image as a one-view study (view type OTHER's embedding is irrelevant to ranks)."""
    mask = torch.ones(len(images), 1, dtype=torch.bool, device=images.device)
    types = torch.zeros(len(images), 1, dtype=torch.long, device=images.device)
    return classifier(images[:, None], mask, types)


def class_activation_maps(classifier: Any, images: torch.Tensor, label_index: Sequence[int]) -> np.ndarray:
    """CAMs ``(N, gh, gw)`` of images ``[N, 3, H, W]`` for one head label each (see the module docstring)."""
    encoder = classifier.encoder
    device = next(classifier.parameters()).device
    images, rows = images.to(device), torch.as_tensor(list(label_index), device=device)
    was_training = classifier.training
    classifier.eval()
    try:
        if encoder.additive_patches:
            with torch.no_grad():
                cells = encoder.encode_patches(images, normalize=False).float()
                return torch.einsum("nhwd,nd->nhw", cells, classifier.head.weight[rows].float()).cpu().numpy()
        visual = encoder.clip.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "grid_size"):
            raise NotImplementedError("CAMs need a timm CNN tower with avg pooling + linear projection or an "
                                      "open_clip ViT")
        captured: dict[str, torch.Tensor] = {}

        def keep_input(_module, args):
            args[0].retain_grad()
            captured["tokens"] = args[0]

        handle = blocks[-1].register_forward_pre_hook(keep_input)
        try:
            with torch.enable_grad():  # the input carries the gradient: a frozen (linear-probe) tower has none
                logits = _single_view_logits(classifier, images.detach().clone().requires_grad_(True))
                classifier.zero_grad(set_to_none=True)
                logits.gather(1, rows[:, None]).sum().backward()
        finally:
            handle.remove()
        tokens, grads = captured["tokens"].detach().float(), captured["tokens"].grad.float()
        grid_h, grid_w = visual.grid_size
        prefix = tokens.shape[1] - grid_h * grid_w  # class / register tokens come first
        weights = grads[:, prefix:].mean(dim=1, keepdim=True)
        cam = torch.relu((weights * tokens[:, prefix:]).sum(-1))
        classifier.zero_grad(set_to_none=True)
        return cam.reshape(len(images), grid_h, grid_w).cpu().numpy()
    finally:
        classifier.train(was_training)


def _squares_and_boxes(dataset: Any, i: int, j: int, boxes: list[list[float]], size: int):
    """uint8 square of view ``j`` of study ``i`` and its boxes in the square frame (cache or manifest source)."""
    if getattr(dataset, "is_cache", False):
        return dataset._study_images(i, [j])[0], boxes
    from rvl.data.io import box_to_square, read_image, to_square_uint8

    image = read_image(dataset._paths[i][j])
    return to_square_uint8(image, size), [box_to_square(b, *image.shape, size) for b in boxes]


def _heatmaps(classifier: Any, squares: list[np.ndarray], label_index: Sequence[int]) -> np.ndarray:
    from rvl.heatmap import upsample
    from rvl.retrieval.embed import images_to_tensor

    grids = class_activation_maps(classifier, images_to_tensor(classifier.encoder, squares), label_index)
    return upsample(grids, squares[0].shape)


def pointing_game(classifier: Any, dataset: Any, labels: Sequence[str], max_boxes: int = 400,
                  batch_size: int = 16) -> dict[str, Any]:
    """Share of finding boxes (of the chosen labels, on the views the classifier reads) whose image's CAM for that
    label peaks inside the box."""
    from rvl.heatmap import pointing_hit

    frame = dataset.frame
    if "finding_boxes" not in frame:
        return {"accuracy": None, "n": 0, "note": "no finding_boxes column"}
    from rvl.data.dataset import select_views

    trials = []
    for i, raw in enumerate(frame["finding_boxes"]):
        if not isinstance(raw, str) or not raw.strip():
            continue
        # the views the classifier reads (one frontal-first view for --views frontal)
        seen = set(select_views(list(frame["view_positions"].iloc[i]), dataset.max_views, None))
        for j, boxes in enumerate(json.loads(raw)):
            if j not in seen:
                continue
            for box in boxes or []:
                if box.get("label") in labels and box.get("box") is not None:
                    trials.append((i, j, box["label"], list(box["box"])))
    trials = trials[:max_boxes]
    per_label: dict[str, list[bool]] = {}
    size = classifier.encoder.image_size
    for start in range(0, len(trials), batch_size):
        chunk = trials[start:start + batch_size]
        squares, boxes = zip(*[_squares_and_boxes(dataset, i, j, [box], size) for i, j, _, box in chunk])
        maps = _heatmaps(classifier, list(squares), [list(labels).index(label) for _, _, label, _ in chunk])
        for heatmap, box, (_, _, label, _) in zip(maps, boxes, chunk):
            per_label.setdefault(label, []).append(pointing_hit(heatmap, box[0]))
    hits = [h for v in per_label.values() for h in v]
    return {"accuracy": float(np.mean(hits)) if hits else None, "n": len(hits),
            "per_label": {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(per_label.items())}}


def write_overlays(classifier: Any, dataset: Any, probs: np.ndarray, labels: Sequence[str], count: int,
                   out_dir: Path) -> list[str]:
    """CAM overlays of the first frontal view of ``count`` test studies, for each study's highest-scoring label (its
    boxes of that label drawn when the data has them)."""
    from rvl.data.dataset import select_views
    from rvl.heatmap import save_overlay

    written = []
    size = classifier.encoder.image_size
    for i in range(min(count, len(dataset))):
        j = select_views(list(dataset.frame["view_positions"].iloc[i]), 1, None)[0]  # frontal first
        c = int(np.argmax(probs[i]))
        raw = dataset.frame["finding_boxes"].iloc[i] if "finding_boxes" in dataset.frame else ""
        views = json.loads(raw) if isinstance(raw, str) and raw.strip() else []
        boxes = [list(b["box"]) for b in (views[j] if j < len(views) else []) or []
                 if b.get("label") == labels[c] and b.get("box") is not None]
        square, boxes = _squares_and_boxes(dataset, i, j, boxes, size)
        heatmap = _heatmaps(classifier, [square], [c])[0]
        study = str(dataset.frame["study_id"].iloc[i])
        name = f"cam_{i:03d}_{study}_{labels[c].replace(' ', '_')}.png"
        written.append(str(save_overlay(square, heatmap, out_dir / name, boxes=boxes,
                                        title=f"{study}: {labels[c]} (score {probs[i, c]:.2f})")))
    return written
