"""rvl.heatmap: heatmap shape and alignment with the image, pointing game, overlay PNG, CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rvl.heatmap import grounding_heatmaps, heatmap_peak, pointing_hit, save_overlay, upsample

GRID, DIM, SIZE = 4, 8, 64


class HotPatchModel(torch.nn.Module):
    """encode_patches returns a 4x4 grid whose patch ``hot`` (row, col) points along the text direction e0 and the
    rest along e1, so the right heatmap has its maximum exactly over that patch."""

    embed_dim = DIM

    def __init__(self, hot):
        super().__init__()
        self.hot = hot
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image, np.float32) / 255.0)[None].repeat(3, 1, 1)

    def encode_patches(self, images, normalize=True):
        patches = torch.zeros(len(images), GRID, GRID, DIM)
        patches[..., 1] = 1.0
        patches[:, self.hot[0], self.hot[1]] = torch.eye(DIM)[0]
        return patches

    def encode_reports(self, texts, batch_size=64):
        return torch.eye(DIM)[[0] * len(texts)]


@pytest.mark.parametrize("hot", [(1, 2), (3, 0), (0, 0), (2, 3)])
def test_peak_lies_on_the_matching_patch(hot):
    model = HotPatchModel(hot)
    squares = [np.zeros((SIZE, SIZE), np.uint8)] * 2
    heatmaps = grounding_heatmaps(model, squares, "left pleural effusion")
    assert heatmaps.shape == (2, SIZE, SIZE)
    row, col = hot
    patch = SIZE // GRID
    # similarity 1 on the hot patch, 0 elsewhere; a 16-px patch's centre falls between pixels, so the bilinear peak
    # is (1 - 0.5/16)^2 (or 1 at the image border); it is over that patch, in the image (x right, y down) frame
    assert heatmaps[0].max() >= (1 - 0.5 / patch) ** 2 - 1e-5 and heatmaps[0].min() >= -1e-6
    x, y = heatmap_peak(heatmaps[0])
    assert col * patch <= x * SIZE <= (col + 1) * patch and row * patch <= y * SIZE <= (row + 1) * patch
    box = [col / GRID, row / GRID, (col + 1) / GRID, (row + 1) / GRID]
    assert pointing_hit(heatmaps[0], box)
    other = [((col + 2) % GRID) / GRID, ((row + 2) % GRID) / GRID, ((col + 2) % GRID + 1) / GRID,
             ((row + 2) % GRID + 1) / GRID]
    assert not pointing_hit(heatmaps[0], other)


def test_upsample_keeps_values_and_centres():
    grid = np.zeros((4, 4), np.float32)
    grid[2, 1] = 1.0
    up = upsample(grid, 64)
    assert up.shape == (64, 64)
    # patch (2, 1) spans rows 32..47, cols 16..31; the four pixels around its centre (39.5, 23.5) hold the peak
    peak = np.argwhere(up == up.max())
    assert sorted(map(tuple, peak.tolist())) == [(39, 23), (39, 24), (40, 23), (40, 24)]
    assert np.isclose(up.max(), (1 - 1 / 32) ** 2) and up[8, 56] == 0.0
    np.testing.assert_allclose(upsample(np.full((2, 3, 3), 0.3, np.float32), (12, 12)), 0.3, rtol=1e-6)


def test_real_model_heatmap_overlay_and_cli(tmp_path):
    from rvl.cli import main
    from rvl.model import create_model

    model = create_model("rvl-tiny").eval()
    rng = np.random.default_rng(0)
    squares = [rng.integers(0, 255, (model.image_size, model.image_size), dtype=np.uint8) for _ in range(2)]
    heatmaps = grounding_heatmaps(model, squares, ["pleural effusion", "left pneumothorax"])
    assert heatmaps.shape == (2, model.image_size, model.image_size)
    assert np.all(np.abs(heatmaps) <= 1.0 + 1e-5) and heatmaps[0].std() > 0  # cosine similarities, not constant
    out = save_overlay(squares[0], heatmaps[0], tmp_path / "o.png", title="t", boxes=[[0.1, 0.1, 0.5, 0.5]])
    assert Image.open(out).size[0] > 100
    model_dir = model.save_pretrained(tmp_path / "model")
    Image.fromarray(squares[1][:, :40]).save(tmp_path / "cxr.png")  # non-square: padded like rvl prepare
    assert main(["heatmap", "--model", str(model_dir), "--image", str(tmp_path / "cxr.png"), "--text",
                 "left pleural effusion", "--out", str(tmp_path / "hm.png")]) == 0
    assert Image.open(tmp_path / "hm.png").format == "PNG"
    assert main(["heatmap", "--model", str(model_dir), "--image", str(tmp_path / "nope.png"), "--text", "x",
                 "--out", str(tmp_path / "x.png")]) == 2


def test_cnn_heatmap_cells_share_out_the_image_text_score():
    """For the timm CNN tower the heatmap cells are additive: their mean is the pooled image embedding's score."""
    import torch

    from rvl.heatmap import patch_similarity
    from rvl.model import create_model

    torch.manual_seed(0)
    model = create_model("rvl-demo", tokenizer_texts=["left pleural effusion", "no pneumothorax"]).eval()
    assert model.additive_patches
    images = torch.randn(2, 3, model.image_size, model.image_size)
    text = model.encode_reports(["left pleural effusion", "no pneumothorax"]).numpy()
    grids = patch_similarity(model, images, text)
    with torch.no_grad():
        pooled = model.encode_image(images, normalize=False).numpy()
    np.testing.assert_allclose(grids.mean(axis=(1, 2)), (pooled * text).sum(-1), rtol=1e-4, atol=1e-5)
