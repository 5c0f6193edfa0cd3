"""PNG renderings for the page: radiographs at display size and heatmap overlays aligned with them.

The model sees each view resized into a zero-padded square (:func:`rvl.data.io.to_square_uint8`); its patch grid
covers that square. An overlay upsamples the grid to a square of the display image's long side and crops the padding
away again, so the colours sit on the pixels the model looked at.
"""
from __future__ import annotations

import base64
import functools
import io

import numpy as np

HEATMAP_ALPHA = 0.45
DISPLAY_MAX_SIDE = 1024


def display_uint8(image: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """A float [0, 1] (or uint8) ``(H, W)`` radiograph in display orientation as uint8, long side at most
    ``max_side``."""
    from rvl.data.io import square_geometry, to_square_uint8

    height, width = image.shape
    if image.dtype == np.uint8:
        if max(height, width) <= max_side:
            return image
        image = image.astype(np.float32) / 255.0
    if max(height, width) <= max_side:
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    new_h, new_w, top, left = square_geometry(height, width, max_side)
    return to_square_uint8(image, max_side)[top:top + new_h, left:left + new_w]  # same resampling as the model input


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB array -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@functools.lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.float32)


def content_map(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """A patch grid of the padded square, upsampled and cropped to an ``(height, width)`` image."""
    from rvl.data.io import square_geometry
    from rvl.heatmap import upsample

    side = max(height, width)
    new_h, new_w, top, left = square_geometry(height, width, side)
    return upsample(grid, side)[top:top + new_h, left:left + new_w]


def overlay_png(display: np.ndarray, heat: np.ndarray, low: float, high: float) -> tuple[bytes, tuple[float, float]]:
    """The radiograph with ``heat`` (same shape, scaled from ``low`` to ``high``) in the jet colormap over it and a
    white cross at its maximum; returns the PNG and the normalised (x, y) of the maximum."""
    from PIL import Image, ImageDraw

    from rvl.heatmap import heatmap_peak

    scaled = np.clip((heat - low) / max(high - low, 1e-12), 0.0, 1.0)
    colour = _jet()[np.rint(scaled * 255).astype(np.int64)]
    grey = display.astype(np.float32)[..., None]
    blended = np.rint((1 - HEATMAP_ALPHA) * grey + HEATMAP_ALPHA * colour).clip(0, 255).astype(np.uint8)
    x, y = heatmap_peak(heat)
    picture = Image.fromarray(blended)
    draw = ImageDraw.Draw(picture)
    px, py, arm = x * display.shape[1], y * display.shape[0], max(4, min(display.shape) // 25)
    width = max(1, arm // 4)
    draw.line([(px - arm, py), (px + arm, py)], fill=(255, 255, 255), width=width)
    draw.line([(px, py - arm), (px, py + arm)], fill=(255, 255, 255), width=width)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue(), (float(x), float(y))
