"""Procedural chest anatomy for the phantoms: per-patient parameters, per-image pose, and the base PA/AP and lateral
renderings as an additive *density* map (higher = more attenuation = brighter on a standard viewer).

Coordinates. Every view is drawn in a canonical frame ``(u, v)`` spanning roughly ``[-1, 1]`` (``u`` right on the
image, ``v`` down). For frontal views ``u`` is the patient's left-right axis in radiological convention (patient's left
on the image right, for PA and AP alike); for the lateral view ``u`` is the antero-posterior axis (anterior on the
image left, spine on the right). A per-image :class:`Pose` (scale, rotation, shift) maps canonical to image
coordinates; the image is the canonical drawing warped by the pose, so boxes are exact images of canonical boxes.

Speed: all shapes are closed-form soft masks evaluated with whole-array numpy ops on float32 grids cached per size;
the base anatomy is drawn once per patient and view in the canonical frame at half resolution; each image is a copy
with its findings drawn in small windows, mapped to grey levels by a lookup table, posed by one Pillow affine warp,
upsampled by one Pillow resize, plus a cropped noise field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

try:  # the ufunc behind np.clip, minus np.clip's Python-level wrapper (~10 us a call; a view makes 20+ calls)
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # numpy < 2
    from numpy.core.umath import clip as _clip_ufunc

__all__ = ["Pose", "TextureBank", "ViewCanvas", "sample_anatomy", "sample_pose", "render_frontal", "render_lateral",
           "canonical_grid", "finish_image"]

F32 = np.float32


def clip(x: np.ndarray, lo: float, hi: float | None, out: np.ndarray | None = None) -> np.ndarray:
    """``np.clip`` for the renderer's float32 arrays (``hi=None``: lower bound only)."""
    if hi is None:
        return np.maximum(x, lo, out=out)
    return _clip_ufunc(x, lo, hi, out=out)


@lru_cache(maxsize=8)
def canonical_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in ``[-1, 1]`` as float32 (X varies along columns, Y along rows); read-only."""
    axis = ((np.arange(size, dtype=F32) + F32(0.5)) / F32(size) * F32(2) - F32(1)).astype(F32)
    grid_x = np.broadcast_to(axis[None, :], (size, size)).copy()
    grid_y = np.broadcast_to(axis[:, None], (size, size)).copy()
    grid_x.flags.writeable = False
    grid_y.flags.writeable = False
    return grid_x, grid_y


@dataclass(frozen=True)
class Pose:
    """Canonical -> image mapping: ``image = 0.5 + 0.5 * (scale * R(angle) @ canonical + shift)``."""

    scale: float = 1.0
    angle: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical points -> normalised image coordinates in ``[0, 1]`` (x right, y down)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = 0.5 + 0.5 * (self.scale * (c * u - s * v) + self.shift_x)
        y = 0.5 + 0.5 * (self.scale * (s * u + c * v) + self.shift_y)
        return x, y

    def box_to_image(self, box: tuple[float, float, float, float]) -> list[float] | None:
        """Axis-aligned image box of a canonical box, clipped to ``[0, 1]``; None when it falls outside the image."""
        u0, v0, u1, v1 = box
        c, s, k = math.cos(self.angle), math.sin(self.angle), 0.5 * self.scale
        xs = [0.5 + k * (c * u - s * v) + 0.5 * self.shift_x for u, v in ((u0, v0), (u1, v0), (u0, v1), (u1, v1))]
        ys = [0.5 + k * (s * u + c * v) + 0.5 * self.shift_y for u, v in ((u0, v0), (u1, v0), (u0, v1), (u1, v1))]
        out = [min(max(min(xs), 0.0), 1.0), min(max(min(ys), 0.0), 1.0), min(max(max(xs), 0.0), 1.0),
               min(max(max(ys), 0.0), 1.0)]
        if out[2] - out[0] < 1e-3 or out[3] - out[1] < 1e-3:
            return None
        return [round(x, 4) for x in out]


class TextureBank:
    """Seeded textures shared by all images of one run (identical in every worker, so output does not depend on the
    worker count): quantum-noise fields at a few amplitudes, a smooth mottle for airspace disease, and pre-drawn
    vessel trees (lung markings) for frontal and lateral views. Images take random crops / picks: no per-image cost.
    """

    noise_levels = (2.0, 3.0, 4.5, 6.0)  # noise standard deviations in 8-bit grey levels

    def __init__(self, seed: int, size: int, render_size: int, n_trees: int = 16):
        rng = np.random.default_rng([int(seed), 7919])
        base = rng.standard_normal((2 * size, 2 * size), dtype=F32)
        self.noise = [np.round(base * F32(level)).astype(np.int16) for level in self.noise_levels]
        side = 2 * render_size
        spectrum = np.fft.rfft2(rng.standard_normal((side, side)))
        radius = np.sqrt(np.fft.rfftfreq(side)[None, :] ** 2 + np.fft.fftfreq(side)[:, None] ** 2) * render_size
        field_ = np.fft.irfft2(spectrum * np.exp(-(radius / 14.0) ** 2), s=(side, side))  # ~14 blobs per image width
        self.mottle = (field_ / (field_.std() + 1e-9)).astype(F32)
        frontal_roots = [(s * 0.16, -0.04, ang) for s in (-1, 1) for ang in
                         ((-1.9, -2.6, 3.0, 2.5) if s < 0 else (-1.2, -0.5, 0.1, 0.6))]
        lateral_roots = [(0.02, -0.05, ang) for ang in (-2.2, -1.3, -0.4, 0.5, 1.4, 2.4, 3.0)]
        self.frontal_trees = [_vessel_tree(render_size, rng, frontal_roots) for _ in range(n_trees)]
        self.lateral_trees = [_vessel_tree(render_size, rng, lateral_roots) for _ in range(n_trees)]

    @staticmethod
    def crop(bank: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
        """A ``(size, size)`` view of ``bank`` at a random offset (no copy)."""
        oy, ox = rng.integers(0, bank.shape[0] - size + 1, size=2)
        return bank[oy:oy + size, ox:ox + size]


@dataclass
class ViewCanvas:
    """One image being drawn, in the canonical frame at render resolution (finding renderers draw into ``density``)."""

    view: str                       # "PA" | "AP" | "LATERAL"
    size: int                       # render resolution (the canonical frame is size x size)
    u: np.ndarray                   # canonical coordinates of each pixel centre (shared, read-only)
    v: np.ndarray
    density: np.ndarray             # additive density map (float32); brighter = denser
    lung: np.ndarray                # soft lung mask in [0, 1] (lateral: both lungs superimposed)
    markings: np.ndarray            # lung-marking (vessel) term already added; findings may remove it locally
    anatomy: dict
    extras: dict = field(default_factory=dict)

    def copy(self) -> "ViewCanvas":
        """A canvas for one image of the patient: own density map, shared read-only anatomy arrays."""
        return ViewCanvas(self.view, self.size, self.u, self.v, self.density.copy(), self.lung, self.markings,
                          self.anatomy, dict(self.extras))

    def window(self, box: tuple[float, float, float, float], margin: float = 0.03) -> tuple[slice, slice] | None:
        """Pixel slices covering a canonical box (+margin): a finding is evaluated only where it can be."""
        u0, v0, u1, v1 = box
        scale = self.size / 2.0
        c0, c1 = max(0, int((u0 - margin + 1) * scale)), min(self.size, int(math.ceil((u1 + margin + 1) * scale)))
        r0, r1 = max(0, int((v0 - margin + 1) * scale)), min(self.size, int(math.ceil((v1 + margin + 1) * scale)))
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1)


def _soft_ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float,
                  edge: float = 0.1) -> np.ndarray:
    """1 inside the ellipse, 0 outside, linear ramp of relative width ``edge`` (in r^2 units) at the border."""
    r2 = np.square((u - F32(cu)) * F32(1.0 / ru)) + np.square((v - F32(cv)) * F32(1.0 / rv))
    return clip((F32(1.0) - r2) * F32(1.0 / edge), 0.0, 1.0)


def _soft_rotated_ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float, angle: float,
                         edge: float = 0.1) -> np.ndarray:
    """Like :func:`_soft_ellipse` with the ``ru`` axis rotated by ``angle`` (radians, towards +v)."""
    c, s = math.cos(angle), math.sin(angle)
    du, dv = u - F32(cu), v - F32(cv)
    r2 = np.square((du * F32(c) + dv * F32(s)) * F32(1 / ru)) + np.square((dv * F32(c) - du * F32(s)) * F32(1 / rv))
    return clip((F32(1) - r2) * F32(1 / edge), 0.0, 1.0)


def sample_anatomy(rng: np.random.Generator) -> dict:
    """Per-patient anatomy (shared by all of the patient's studies; findings may modify a copy)."""
    sex = "F" if rng.random() < 0.5 else "M"
    lung_cx = rng.uniform(0.38, 0.43)
    lung_rx = rng.uniform(0.29, 0.34)
    thorax_half = lung_cx + lung_rx
    ctr = rng.uniform(0.38, 0.5)
    return {
        "sex": sex,
        "age": int(rng.integers(18, 95)),
        "body_rx": rng.uniform(0.86, 0.97), "habitus": rng.uniform(0.8, 1.2),
        "lung_cx": lung_cx, "lung_rx": lung_rx, "lung_cy": rng.uniform(0.04, 0.1), "lung_ry": rng.uniform(0.68, 0.76),
        "dome_right": rng.uniform(0.27, 0.35), "dome_gap": rng.uniform(0.02, 0.07),
        "heart_cx": rng.uniform(0.08, 0.13), "heart_cy": rng.uniform(0.16, 0.2),
        "heart_rx": ctr * thorax_half, "heart_ry": rng.uniform(0.24, 0.28), "ctr": ctr,
        "heart_tilt": rng.uniform(0.35, 0.6), "heart_aspect": rng.uniform(0.62, 0.75),
        "mediastinum_w": rng.uniform(0.085, 0.11),
        "spine_w": rng.uniform(0.055, 0.07), "vertebra_h": rng.uniform(0.11, 0.13),
        "rib_spacing": rng.uniform(0.125, 0.15), "rib_curve": rng.uniform(0.3, 0.45), "rib_phase": rng.uniform(0, 1),
        "clavicle_v": rng.uniform(-0.64, -0.56), "clavicle_rise": rng.uniform(0.3, 0.4),
        "marking_gain": rng.uniform(0.8, 1.2), "tree": int(rng.integers(0, 1 << 20)),
        # lateral projection
        "lat_lung_cu": rng.uniform(0.0, 0.05), "lat_lung_ru": rng.uniform(0.52, 0.58),
        "lat_heart_cu": rng.uniform(-0.26, -0.18), "lat_heart_ru": rng.uniform(0.26, 0.32),
        "lat_spine_u": rng.uniform(0.5, 0.56), "lat_dome": rng.uniform(0.26, 0.32),
    }


def sample_pose(rng: np.random.Generator, view: str) -> tuple[Pose, dict]:
    """Per-image positioning and exposure."""
    portable = view == "AP"
    pose = Pose(scale=float(rng.uniform(0.9, 1.02)), angle=float(rng.normal(0, 0.05 if portable else 0.03)),
                shift_x=float(rng.normal(0, 0.025)), shift_y=float(rng.normal(0.02, 0.03)))
    exposure = {"gain": float(rng.uniform(0.88, 1.12)), "offset": float(rng.uniform(-0.04, 0.04)),
                "gamma": round(float(rng.uniform(0.85, 1.15)), 2),
                "noise_level": int(rng.integers(1, 4) if portable else rng.integers(0, 3))}
    return pose, exposure


def _vessel_tree(size: int, rng: np.random.Generator, roots: list[tuple[float, float, float]]) -> np.ndarray:
    """Branching vessel-like lines from the hila (drawn once per patient with Pillow, then blurred)."""
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    px = size / 2.0
    stack = [(u, v, angle, 0.2, 4.0, 0) for u, v, angle in roots]
    while stack:
        u, v, angle, length, width, depth = stack.pop()
        u1, v1 = u + length * math.cos(angle), v + length * math.sin(angle)
        draw.line([((u + 1) * px, (v + 1) * px), ((u1 + 1) * px, (v1 + 1) * px)], fill=int(255 - 40 * depth),
                  width=max(1, int(round(width * size / 256))))
        if depth < 3:
            for _ in range(2 + int(rng.random() < 0.4)):
                stack.append((u1, v1, angle + rng.normal(0, 0.45), length * rng.uniform(0.55, 0.8), width * 0.65,
                              depth + 1))
    image = image.filter(ImageFilter.GaussianBlur(0.6 * size / 128))
    return np.asarray(image, dtype=F32) * F32(1 / 255)


def _superellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    """Body thickness profile: ``sqrt(1 - r^4)`` inside a squarish ellipse (flat centre, shoulders), 0 outside."""
    r4 = np.square(np.square((u - F32(cu)) * F32(1 / ru))) + np.square(np.square((v - F32(cv)) * F32(1 / rv)))
    return np.sqrt(clip(F32(1) - r4, 0, 1))


def render_frontal(size: int, anatomy: dict, textures: TextureBank, view: str = "PA") -> ViewCanvas:
    """Base PA/AP chest in the canonical frame: body, lungs, mediastinum, heart, domes, spine, ribs, clavicles."""
    a = anatomy
    u, v = canonical_grid(size)
    au = np.abs(u)
    portable = view == "AP"
    # AP (portable, supine-ish): heart magnified, lungs less inflated (domes higher).
    heart_rx = a["heart_rx"] * (1.1 if portable else 1.0)
    dome_shift = -0.05 if portable else 0.0
    body = _superellipse(u, v, 0.0, 0.2, a["body_rx"], 1.3)
    # Soft tissue: chest wall, plus the extra thickness of the mediastinum and upper abdomen along the midline.
    density = body * (F32(0.38 * a["habitus"]) + F32(0.13) * clip(F32(1) - np.square(u * F32(1 / 0.5)), 0, 1))
    # Lungs: an ellipse per side (through |u|), cut by the hemidiaphragm domes, the mediastinum and the heart.
    lung_r2 = np.square((au - F32(a["lung_cx"])) * F32(1 / a["lung_rx"])) + \
        np.square((v - F32(a["lung_cy"])) * F32(1 / a["lung_ry"]))
    dome_level = np.where(u < 0, F32(a["dome_right"] + dome_shift), F32(a["dome_right"] + a["dome_gap"] + dome_shift))
    dome = dome_level + F32(0.85) * np.square(au - F32(0.34))
    lung = clip((F32(1) - lung_r2) * F32(6), 0, 1)
    lung *= clip((dome - v) * F32(25), 0, 1)
    mediastinum_half = F32(a["mediastinum_w"]) + F32(0.03) * clip(v + F32(0.3), 0, None)
    lung *= clip((au - mediastinum_half) * F32(20), 0, 1)
    # Heart: an ellipse tilted with its apex down and to the patient's left; heart_rx is its horizontal half-extent
    # (so the cardiothoracic ratio is heart_rx / thoracic half-width whatever the tilt).
    tilt, aspect = a["heart_tilt"], a["heart_aspect"]
    long_axis = heart_rx / math.sqrt(math.cos(tilt) ** 2 + (aspect * math.sin(tilt)) ** 2)
    heart_ry = long_axis * math.sqrt(math.sin(tilt) ** 2 + (aspect * math.cos(tilt)) ** 2)
    heart = _soft_rotated_ellipse(u, v, a["heart_cx"], a["heart_cy"], long_axis, aspect * long_axis, tilt, edge=0.12)
    lung *= F32(1) - heart
    vessels = textures.frontal_trees[a["tree"] % len(textures.frontal_trees)]
    hilar = clip(F32(1.2) - np.abs(au - F32(0.16)) * F32(1.5), F32(0.35), 1)
    markings = vessels * lung * hilar * F32(0.1 * a["marking_gain"])
    # Lungs: darkest at the bases and periphery; apices greyer under the shoulder girdle soft tissue.
    density -= lung * (F32(0.3) - F32(0.06) * clip((F32(-0.3) - v) * F32(3), 0, 1))
    density += markings + heart * F32(0.03)
    density += _soft_ellipse(au, v, 0.16, -0.04, 0.06, 0.09, edge=1.0) * F32(0.05)     # hila
    density += _soft_ellipse(u, v, 0.1, -0.3, 0.06, 0.05, edge=0.6) * F32(0.05)        # aortic knob
    # Spine with vertebral bodies, and ribs (posterior: curve down laterally; anterior: fainter, opposite curvature).
    spine = clip((F32(a["spine_w"]) - au) * F32(40), 0, 1)
    density += spine * (F32(0.035) + F32(0.012) * np.cos(v * F32(2 * math.pi / a["vertebra_h"])))
    thorax = clip((F32(1.3) - lung_r2) * F32(4), 0, 1) * clip((dome + F32(0.06) - v) * F32(20), 0, 1)
    rib_phase = (v - F32(a["rib_curve"]) * np.square(au) - F32(0.12) * au) * F32(2 * math.pi / a["rib_spacing"])
    ribs = clip(np.cos(rib_phase + F32(a["rib_phase"] * 2 * math.pi)) - F32(0.3), 0, None)
    ant_phase = (v + F32(0.55) * au) * F32(2 * math.pi / (a["rib_spacing"] * 1.25))
    ribs += clip(np.cos(ant_phase) - F32(0.55), 0, None) * F32(0.5)
    density += ribs * thorax * F32(0.07)
    # Clavicles: bands rising laterally from the sternal notch.
    clav_center = F32(a["clavicle_v"]) - F32(a["clavicle_rise"]) * au + F32(0.2) * np.square(au)
    clav = clip(F32(1.3) - np.abs(v - clav_center) * F32(1 / 0.035), 0, 1)
    clav *= clip((au - F32(0.05)) * F32(30), 0, 1) * clip((F32(0.64) - au) * F32(30), 0, 1)
    density += clav * F32(0.1)
    # Trachea (air column down to the carina) and gastric bubble under the left hemidiaphragm.
    trachea = clip((F32(0.035) - np.abs(u - F32(0.01))) * F32(60), 0, 1) * clip((F32(-0.22) - v) * F32(20), 0, 1)
    density -= trachea * F32(0.08)
    bubble_v = a["dome_right"] + a["dome_gap"] + dome_shift + 0.13
    density -= _soft_ellipse(u, v, 0.4, bubble_v, 0.09, 0.05, edge=0.5) * F32(0.1)
    if a["sex"] == "F":
        density += _soft_ellipse(au, v, 0.45, 0.4, 0.3, 0.22, edge=0.6) * F32(0.05)
    canvas = ViewCanvas(view=view, size=size, u=u, v=v, density=density, lung=lung, markings=markings, anatomy=a)
    canvas.extras.update(dome_shift=dome_shift, heart_rx=heart_rx, heart_ry=heart_ry)
    return canvas


def render_lateral(size: int, anatomy: dict, textures: TextureBank) -> ViewCanvas:
    """Base left lateral: superimposed lungs, anterior heart, posterior spine, sternum, domes, posterior sulcus."""
    a = anatomy
    u, v = canonical_grid(size)
    body = _superellipse(u, v, 0.0, 0.2, 0.78, 1.3)
    density = body * F32(0.5 * a["habitus"]) + _soft_ellipse(u, v, -0.1, -0.8, 0.55, 0.35, edge=0.8) * F32(0.12)
    # Taller than the frontal lung ellipse: the posterior costophrenic sulcus is the deepest point of the lungs.
    lung_r2 = np.square((u - F32(a["lat_lung_cu"])) * F32(1 / a["lat_lung_ru"])) + \
        np.square((v - F32(a["lung_cy"] + 0.08)) * F32(1 / (a["lung_ry"] + 0.08)))
    # Diaphragm: highest anteriorly-central, falling to the deep posterior costophrenic sulcus.
    dome = F32(a["lat_dome"]) + F32(0.75) * np.square(u + F32(0.15))
    lung = clip((F32(1) - lung_r2) * F32(6), 0, 1) * clip((dome - v) * F32(25), 0, 1)
    heart_rx = a["lat_heart_ru"] * (a["heart_rx"] / (a["ctr"] * (a["lung_cx"] + a["lung_rx"])))
    heart_ry = a["heart_ry"] + 0.04
    heart = _soft_rotated_ellipse(u, v, a["lat_heart_cu"], a["heart_cy"] + 0.12, heart_rx, heart_ry, -0.35, edge=0.4)
    lung *= F32(1) - F32(0.7) * heart
    vessels = textures.lateral_trees[a["tree"] % len(textures.lateral_trees)]
    markings = vessels * lung * F32(0.07 * a["marking_gain"])
    density -= lung * F32(0.2)
    density += markings + heart * F32(0.04)
    # Spine: vertebral bodies with disc spaces along a gentle kyphosis; sternum anteriorly.
    spine_u = F32(a["lat_spine_u"]) + F32(0.05) * np.square(v)
    spine = clip((F32(0.085) - np.abs(u - spine_u)) * F32(40), 0, 1)
    discs = clip(np.cos(v * F32(2 * math.pi / a["vertebra_h"])) + F32(1.2), 0, 1)
    density += spine * discs * body * F32(0.08)
    density += clip((F32(0.12) - np.abs(u - spine_u - F32(0.16))) * F32(15), 0, 1) * body * F32(0.04)
    sternum = clip((F32(0.025) - np.abs(u + F32(0.62) + F32(0.06) * v)) * F32(60), 0, 1)
    sternum *= clip((v + F32(0.6)) * F32(20), 0, 1) * clip((F32(0.2) - v) * F32(20), 0, 1)
    density += sternum * F32(0.08)
    trachea_u = F32(-0.05) + F32(0.12) * (v + F32(1))
    trachea = clip((F32(0.035) - np.abs(u - trachea_u)) * F32(60), 0, 1) * clip((F32(-0.2) - v) * F32(20), 0, 1)
    density -= trachea * F32(0.08)
    canvas = ViewCanvas(view="LATERAL", size=size, u=u, v=v, density=density, lung=lung, markings=markings, anatomy=a)
    canvas.extras.update(heart_rx=heart_rx * math.cos(0.35) + heart_ry * math.sin(0.35),
                         heart_ry=heart_rx * math.sin(0.35) + heart_ry * math.cos(0.35))
    return canvas


@lru_cache(maxsize=64)
def _display_lut(gamma: float) -> np.ndarray:
    """10-bit normalised exposure -> 8-bit display value through the gamma curve."""
    return (np.power(np.arange(1024) / 1023.0, gamma) * 255 + 0.5).astype(np.uint8)


def finish_image(density: np.ndarray, pose: Pose, exposure: dict, textures: TextureBank, rng: np.random.Generator,
                 out_size: int) -> np.ndarray:
    """Canonical density (render resolution) -> posed uint8 display image of ``out_size`` with quantum noise.

    Order chosen for speed: the contrast curve runs at render resolution, the pose is one Pillow affine warp at
    render resolution, the upsampling one Pillow resize, and the noise an int16 add of a cropped field.
    """
    from PIL import Image

    # Exposure (gain, offset) as one multiply-add into 10-bit indices, then contrast curve (gamma) as a lookup table.
    img = density * F32(1.25 * exposure["gain"] * 1023) + F32((exposure["offset"] + 0.03) * 1023 + 0.5)
    clip(img, 0, 1023, out=img)
    lut = _display_lut(exposure["gamma"])
    display = lut[img.astype(np.uint16)]
    r = density.shape[0]
    c, sn, k = math.cos(pose.angle), math.sin(pose.angle), 1.0 / pose.scale
    h = r / 2.0
    tx, ty = 1 + pose.shift_x, 1 + pose.shift_y
    # Output pixel (continuous coords, same resolution) -> input pixel: inverse of the canonical -> image pose.
    coeffs = (c * k, sn * k, h * (1 - c * k * tx - sn * k * ty), -sn * k, c * k, h * (1 + sn * k * tx - c * k * ty))
    image = Image.fromarray(display).transform((r, r), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    if out_size != r:
        image = image.resize((out_size, out_size), Image.BILINEAR)
    out = np.asarray(image).astype(np.int16)
    out += textures.crop(textures.noise[exposure["noise_level"]], rng, out_size)
    clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
