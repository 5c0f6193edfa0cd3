"""Grounding heatmaps: where on a radiograph a text prompt matches, and the pointing game that scores them.

The model's patch tokens, projected into the joint space (``encode_patches``), are compared with the prompt's text
embedding (cosine for ViT tokens, the additive share of the score for CNN cells); the patch grid is upsampled bilinearly to the image (the padded square frame the model
sees, see :func:`rvl.retrieval.embed.read_square`) and drawn over the radiograph.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def patch_embeddings(model: Any, images: Any) -> np.ndarray:
    """Patch tokens of images ``[N, 3, H, W]`` in the joint space, ``(N, gh, gw, D)`` float32, in the form that
    :func:`similarity_maps` compares with text (normalised for ViT tokens, raw for additive CNN cells).

    Separate from the comparison so that a caller (``rvl serve``) can keep a study's patches and map many prompts.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            additive = bool(getattr(model, "additive_patches", False))
            return model.encode_patches(images.to(device), normalize=not additive).float().cpu().numpy()
    finally:
        model.train(was_training)


def similarity_maps(patches: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """``(N, gh, gw, D)`` patch embeddings vs ``(N, D)`` or ``(D,)`` text embeddings -> ``(N, gh, gw)``."""
    text = np.asarray(text_embeddings, np.float32)
    text = np.broadcast_to(text if text.ndim == 2 else text[None], (len(patches), patches.shape[-1]))
    text = text / np.maximum(np.linalg.norm(text, axis=-1, keepdims=True), 1e-12)
    return np.einsum("nhwd,nd->nhw", patches, text)


def patch_similarity(model: Any, images: Any, text_embeddings: np.ndarray) -> np.ndarray:
    """Similarity of every patch with a text embedding: images ``[N, 3, H, W]`` and ``(N, D)`` or ``(D,)`` text
    embeddings -> ``(N, gh, gw)``.

    ViT patch tokens: cosine similarity. Towers whose cells average to the view embedding (``model.additive_patches``,
    the CNN of rvl-demo): the dot product of the unnormalised cell with the normalised text, i.e. the cell's share of
    the image-text score (on the demo phantoms 0.19 pointing-game accuracy against 0.12 for the cosine).
    """
    return similarity_maps(patch_embeddings(model, images), text_embeddings)


def upsample(grid: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``(gh, gw)`` or ``(N, gh, gw)`` maps to ``size`` (pixel centres aligned, as images)."""
    import torch
    import torch.nn.functional as F

    size = (size, size) if isinstance(size, int) else tuple(size)
    tensor = torch.from_numpy(np.ascontiguousarray(grid, np.float32))
    squeeze = tensor.ndim == 2
    tensor = tensor[None, None] if squeeze else tensor[:, None]
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    return out[0] if squeeze else out


def grounding_heatmaps(model: Any, squares: Sequence[np.ndarray], prompts: Sequence[str] | str) -> np.ndarray:
    """Heatmaps ``(N, S, S)`` (see :func:`patch_similarity`) of uint8 ``S`` x ``S`` radiographs vs prompts (one or one each)."""
    from rvl.retrieval.embed import embed_texts, images_to_tensor

    prompts = [prompts] * len(squares) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(squares):
        raise ValueError(f"{len(squares)} images but {len(prompts)} prompts")
    unique = sorted(set(prompts))
    text = embed_texts(model, unique)
    text = text[[unique.index(p) for p in prompts]]
    grids = patch_similarity(model, images_to_tensor(model, squares), text)
    return upsample(grids, squares[0].shape)


def heatmap_peak(heatmap: np.ndarray) -> tuple[float, float]:
    """Normalised (x, y) of the heatmap maximum, the point of the pointing game.

    Bilinear upsampling holds border patches constant out to the image edge, so the maximum can be a plateau; the
    centroid of the maximal pixels is used (a single pixel, the patch centre, for interior patches).
    """
    peak = heatmap >= heatmap.max() - 1e-6 * max(1.0, abs(float(heatmap.max())))
    rows, cols = np.nonzero(peak)
    return (cols.mean() + 0.5) / heatmap.shape[1], (rows.mean() + 0.5) / heatmap.shape[0]


def pointing_hit(heatmap: np.ndarray, box: Sequence[float]) -> bool:
    """Whether the heatmap's maximum falls inside a normalised ``[x0, y0, x1, y1]`` box."""
    x, y = heatmap_peak(heatmap)
    x0, y0, x1, y1 = box
    return bool(x0 <= x <= x1 and y0 <= y <= y1)


def save_overlay(square: np.ndarray, heatmap: np.ndarray, out: str | os.PathLike, title: str | None = None,
                 boxes: Sequence[Sequence[float]] = (), alpha: float = 0.45) -> Path:
    """Write a PNG of the radiograph with the heatmap (jet, min-max scaled) over it, the peak marked and optional
    normalised boxes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from rvl.metrics import save_figure

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size_y, size_x = square.shape
    scaled = (heatmap - heatmap.min()) / max(float(np.ptp(heatmap)), 1e-12)
    fig, ax = plt.subplots(figsize=(5, 5.3), dpi=100)
    ax.imshow(square, cmap="gray", vmin=0, vmax=255)
    ax.imshow(scaled, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    px, py = heatmap_peak(heatmap)
    ax.plot(px * size_x - 0.5, py * size_y - 0.5, marker="+", color="white", markersize=14, mew=2)
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0 * size_x - 0.5, y0 * size_y - 0.5), (x1 - x0) * size_x, (y1 - y0) * size_y,
                               fill=False, edgecolor="lime", linewidth=1.5))
    if title:
        ax.set_title(title, fontsize=9)
    ax.axis("off")
    return save_figure(fig, out)


# ------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model: an rvl export folder, an unmodified open_clip model (local-dir:DIR or its folder, "
                        "hf-hub:ORG/NAME) or NAME:TAG (open_clip name and pretrained tag, e.g. ViT-B-16:openai)")
    parser.add_argument("--image", required=True, help="radiograph (PNG/JPEG/DICOM)")
    parser.add_argument("--text", required=True, help='prompt, e.g. "left pleural effusion"')
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from rvl.data.io import ImageReadError
    from rvl.retrieval.embed import load_model, read_square

    try:
        model = load_model(args.model, args.device)
        square = read_square(args.image, model.image_size)
    except (FileNotFoundError, ImageReadError, ValueError) as err:
        print(f"rvl heatmap: error: {err}", file=sys.stderr)
        return 2
    heatmap = grounding_heatmaps(model, [square], args.text)[0]
    out = save_overlay(square, heatmap, args.out, title=f"{Path(args.image).name}: {args.text}")
    x, y = heatmap_peak(heatmap)
    print(f"wrote {out} (peak at x={x:.2f}, y={y:.2f} of the padded square image; peak score {heatmap.max():.3f})")
    return 0
