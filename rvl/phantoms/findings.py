"""Findings drawn into a :class:`~rvl.phantoms.anatomy.ViewCanvas`, with their canonical boxes.

Each finding is a patient-level *process* (kind, side, fixed geometry) whose severity changes from study to study.
``draw_finding`` adds its density to one canvas (evaluated only in a small window) and returns ``[(side, box)]`` in the
canonical frame of that view; the generator maps boxes through the image pose. Geometry is 3-D-consistent: a frontal
``u`` is the patient's left-right position (patient's left = +u = image right), a lateral ``u`` the antero-posterior
position (posterior = +u), ``v`` is height in both. Anatomy-changing findings (cardiomegaly, widened mediastinum) act
through :func:`apply_to_anatomy` before the base drawing.
"""
from __future__ import annotations

import math

import numpy as np

from .anatomy import F32, TextureBank, ViewCanvas, clip

__all__ = ["SIDE_SIGN", "sample_geometry", "apply_to_anatomy", "draw_finding", "lesion_name"]

SIDE_SIGN = {"right": -1.0, "left": 1.0}  # frontal image x: the patient's right is on the image left
Box = tuple[float, float, float, float]


def lesion_name(severity: float) -> str:
    """A lung lesion above 3 cm (severity > 0.55) is a mass, otherwise a nodule."""
    return "mass" if severity > 0.55 else "nodule"


def _sides(side: str | None) -> list[str]:
    return ["right", "left"] if side == "bilateral" else [side or "right"]


def _dome(a: dict, side: str, canvas_extras: dict | None = None) -> float:
    """Height of the hemidiaphragm dome apex on one side (frontal)."""
    shift = (canvas_extras or {}).get("dome_shift", 0.0)
    return a["dome_right"] + shift + (a["dome_gap"] if side == "left" else 0.0)


def sample_geometry(kind: str, side: str | None, a: dict, rng: np.random.Generator) -> dict:
    """Fixed location/shape parameters of a finding process (drawn once, reused at every study)."""
    if kind in ("consolidation", "lung_opacity", "lung_lesion"):
        zone = rng.choice(["upper", "middle", "lower"], p=[0.3, 0.3, 0.4] if kind != "lung_lesion" else [0.4, 0.35,
                                                                                                          0.25])
        v = {"upper": -0.38, "middle": -0.1, "lower": 0.14}[str(zone)] + rng.uniform(-0.06, 0.06)
        # Lateral third of the lung in the lower zone keeps the lesion clear of the heart.
        u_abs = a["lung_cx"] + a["lung_rx"] * (rng.uniform(-0.2, 0.45) if zone != "lower" else rng.uniform(0.15, 0.5))
        return {"zone": str(zone), "u": SIDE_SIGN[side] * u_abs, "v": v, "z": rng.uniform(-0.32, 0.32),
                "aspect": rng.uniform(0.7, 1.35), "tex": int(rng.integers(0, 1 << 30))}
    if kind == "atelectasis":
        return {"u_abs": a["lung_cx"] + a["lung_rx"] * rng.uniform(-0.1, 0.35), "dv": rng.uniform(0.08, 0.18),
                "angle": rng.normal(0, 0.15), "z": rng.uniform(-0.3, 0.3)}
    if kind == "rib_fracture":
        u_abs = rng.uniform(0.45, 0.65)
        base = a["rib_curve"] * u_abs ** 2 + 0.12 * u_abs
        n = rng.integers(-2, 3)
        v = base + a["rib_spacing"] * (n - a["rib_phase"])
        while v < -0.45:
            v += a["rib_spacing"]
        while v > 0.1:
            v -= a["rib_spacing"]
        return {"u": SIDE_SIGN[side] * u_abs, "v": v, "slope": 2 * a["rib_curve"] * u_abs + 0.12}
    if kind == "pleural_thickening":
        v0 = rng.uniform(-0.5, -0.1)
        return {"v0": v0, "v1": v0 + rng.uniform(0.2, 0.4)}
    if kind in ("pleural_effusion", "posterior_effusion", "pneumothorax", "edema"):
        return {"meniscus": rng.uniform(0.2, 0.45), "tex": int(rng.integers(0, 1 << 30))}
    if kind in ("endotracheal_tube", "nasogastric_tube", "central_line", "pacemaker"):
        return {"tip": rng.uniform(-0.06, 0.08), "wobble": rng.uniform(-0.03, 0.03)}
    return {}


def apply_to_anatomy(a: dict, active: dict[str, float]) -> dict:
    """Anatomy of one study given the severities of anatomy-changing findings (returns a modified copy)."""
    if "cardiomegaly" not in active and "widened_mediastinum" not in active:
        return a
    a = dict(a)
    if "cardiomegaly" in active:
        ctr = 0.5 + 0.2 * active["cardiomegaly"]
        a["heart_rx"] = ctr * (a["lung_cx"] + a["lung_rx"])
        a["heart_ry"] = a["heart_ry"] * (1 + 0.25 * active["cardiomegaly"])
    if "widened_mediastinum" in active:
        a["mediastinum_w"] = 0.15 + 0.08 * active["widened_mediastinum"]
    return a


def _blob(canvas: ViewCanvas, cu: float, cv: float, ru: float, rv: float, amp: float, edge: float,
          textures: TextureBank, tex_seed: int, texture: float = 0.3) -> Box | None:
    """Soft elliptical opacity confined to the lung, with a mottled texture (airspace disease, nodules)."""
    box = (cu - ru, cv - rv, cu + ru, cv + rv)
    win = canvas.window(box)
    if win is None:
        return None
    u, v = canvas.u[win], canvas.v[win]
    r2 = np.square((u - F32(cu)) * F32(1 / ru)) + np.square((v - F32(cv)) * F32(1 / rv))
    mask = clip((F32(1) - r2) * F32(1 / edge), 0, 1)
    lung = canvas.lung[win]
    if texture:
        m = textures.mottle
        oy, ox = (tex_seed % (m.shape[0] - canvas.size)), ((tex_seed >> 12) % (m.shape[1] - canvas.size))
        tex = m[oy + win[0].start: oy + win[0].stop, ox + win[1].start: ox + win[1].stop]
        mask = mask * clip(F32(1 - texture) + F32(texture) * tex, 0, 1.5)
    canvas.density[win] += mask * lung * F32(amp) - canvas.markings[win] * mask * F32(0.5)
    return box


def _effusion_frontal(canvas: ViewCanvas, side: str, sev: float, meniscus: float) -> Box | None:
    a = canvas.anatomy
    sgn = SIDE_SIGN[side]
    outer = a["lung_cx"] + a["lung_rx"]
    angle_v = _dome(a, side, canvas.extras) + 0.85 * (outer - 0.04 - 0.34) ** 2  # costophrenic angle height
    top = angle_v - 0.06 - 0.62 * sev   # fluid height at the chest wall
    box = (min(sgn * 0.06, sgn * outer), top - 0.02, max(sgn * 0.06, sgn * outer), angle_v + 0.06)
    win = canvas.window(box)
    if win is None:
        return None
    u, v = canvas.u[win], canvas.v[win]
    # Meniscus: the fluid surface climbs towards the lateral chest wall.
    surface = F32(top) + F32(meniscus) * clip(F32(outer) - np.abs(u), 0, None)
    fluid = clip((v - surface) * F32(18), 0, 1) * (np.abs(u) > 0.02) * (u * F32(sgn) > 0)
    lung = canvas.lung[win]
    canvas.density[win] += fluid * (lung * F32(0.36) - canvas.markings[win])
    inner = max(0.1, outer - (0.25 + 0.5 * sev) / max(meniscus, 0.2) * 0.5)
    u0, u1 = sorted((sgn * inner, sgn * outer))
    return (u0, top - 0.02, u1, angle_v + 0.04)


def _effusion_lateral(canvas: ViewCanvas, sev: float, meniscus: float, small: bool) -> Box | None:
    """Fluid in the posterior costophrenic sulcus (the lowest point of the pleural space when upright): blunts the
    sulcus when small, rises with a meniscus towards the posterior chest wall when larger."""
    a = canvas.anatomy
    sulcus_u = a["lat_lung_cu"] + a["lat_lung_ru"] * 0.8
    sulcus_v = a["lat_dome"] + 0.75 * (sulcus_u + 0.15) ** 2
    height, slope = ((0.1 + 0.1 * sev), 0.3) if small else ((0.12 + 0.42 * sev), meniscus + 0.1)
    top = sulcus_v - height
    # Most anterior point of the fluid: where its surface meets the (anteriorly rising) dome.
    us = np.linspace(sulcus_u - 1.2, sulcus_u, 121)
    wet = top + slope * (sulcus_u - us) <= a["lat_dome"] + 0.75 * (us + 0.15) ** 2
    u_front = float(us[int(np.argmax(wet))]) if wet.any() else sulcus_u - 0.1
    box = (u_front - 0.02, top - 0.02, sulcus_u + 0.08, sulcus_v + 0.03)
    win = canvas.window(box)
    if win is None:
        return None
    u, v = canvas.u[win], canvas.v[win]
    surface = F32(top) + F32(slope) * clip(F32(sulcus_u) - u, 0, None)
    fluid = clip((v - surface) * F32(16), 0, 1)
    canvas.density[win] += fluid * (canvas.lung[win] * F32(0.26) - canvas.markings[win])
    return box


def _pneumothorax(canvas: ViewCanvas, side: str, sev: float) -> Box | None:
    a = canvas.anatomy
    sgn = SIDE_SIGN[side]
    lcx, lrx, lcy, lry = a["lung_cx"], a["lung_rx"], a["lung_cy"], a["lung_ry"]
    v_limit = lcy - lry * (0.35 - 0.9 * sev)   # how far down the lateral chest wall the air extends
    box = (min(sgn * (lcx - 0.6 * lrx), sgn * (lcx + lrx)), lcy - lry - 0.02,
           max(sgn * (lcx - 0.6 * lrx), sgn * (lcx + lrx)), v_limit + 0.05)
    win = canvas.window(box)
    if win is None:
        return None
    u, v = canvas.u[win], canvas.v[win]
    r2 = np.square((np.abs(u) - F32(lcx)) * F32(1 / lrx)) + np.square((v - F32(lcy)) * F32(1 / lry))
    inner = (1.0 - 0.12 - 0.3 * sev) ** 2     # the collapsed lung edge (visceral pleura) at this r^2
    region = clip((v_limit - v) * F32(12), 0, 1) * (u * F32(sgn) > 0) * canvas.lung[win]
    space = clip((r2 - F32(inner)) * F32(25), 0, 1) * region
    line = clip(F32(1) - np.abs(r2 - F32(inner)) * F32(40), 0, 1) * region
    collapsed = clip((F32(inner) - r2) * F32(6), 0, 1) * region  # the collapsing lung is denser
    canvas.density[win] += line * F32(0.12) + collapsed * F32(0.04) - space * (F32(0.1) + canvas.markings[win])
    return box


def _band(canvas: ViewCanvas, cu: float, cv: float, half_len: float, thick: float, angle: float,
          amp: float) -> Box | None:
    """Plate-like linear opacity (discoid atelectasis)."""
    ext = half_len * abs(math.cos(angle)) + thick, half_len * abs(math.sin(angle)) + thick
    box = (cu - ext[0], cv - ext[1], cu + ext[0], cv + ext[1])
    win = canvas.window(box)
    if win is None:
        return None
    du, dv = canvas.u[win] - F32(cu), canvas.v[win] - F32(cv)
    c, s = F32(math.cos(angle)), F32(math.sin(angle))
    along, across = du * c + dv * s, dv * c - du * s
    band = clip(F32(1) - np.abs(across) * F32(1 / thick), 0, 1) * \
        clip((F32(half_len) - np.abs(along)) * F32(1 / (0.3 * half_len)), 0, 1)
    canvas.density[win] += band * canvas.lung[win] * F32(amp)
    return box


def _device(canvas: ViewCanvas, points: list[tuple[float, float]], width: float, amp: float,
            blob: tuple[float, float, float, float] | None = None) -> Box:
    """Radiopaque tube/lead (polyline) and optional generator (rectangle), drawn with Pillow at render size."""
    from PIL import Image, ImageDraw

    size = canvas.size
    px = size / 2.0
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    draw.line([((u + 1) * px, (v + 1) * px) for u, v in points], fill=255, width=max(1, round(width * px)))
    us, vs = [p[0] for p in points], [p[1] for p in points]
    if blob is not None:
        cu, cv, hu, hv = blob
        draw.rounded_rectangle([((cu - hu) + 1) * px, ((cv - hv) + 1) * px, ((cu + hu) + 1) * px, ((cv + hv) + 1) * px],
                               radius=max(1, round(0.3 * hv * px)), fill=255)
        us += [cu - hu, cu + hu]
        vs += [cv - hv, cv + hv]
    canvas.density += np.asarray(image, dtype=F32) * F32(amp / 255)
    return (max(-1.0, min(us)) - width, max(-1.0, min(vs)) - width, min(1.0, max(us)) + width,
            min(1.0, max(vs)) + width)


def _device_points(kind: str, side: str | None, g: dict, a: dict, lateral: bool) -> tuple[list, tuple | None]:
    tip, w = g["tip"], g["wobble"]
    if kind == "endotracheal_tube":
        if lateral:
            return [(-0.08, -1.02), (-0.05 + w, -0.6), (0.0, -0.36 + tip)], None
        return [(0.01 + w, -1.02), (0.01, -0.7), (0.01 + w / 2, -0.36 + tip)], None
    if kind == "nasogastric_tube":
        stomach_v = a["dome_right"] + a["dome_gap"] + 0.12
        if lateral:
            return [(0.12, -1.02), (0.18, -0.4), (0.1, 0.2), (-0.05, stomach_v + 0.1)], None
        return [(0.02 + w, -1.02), (0.03, -0.3), (0.06, 0.28), (0.38, stomach_v + tip)], None
    if kind == "central_line":
        if lateral:
            return [(-0.05, -1.02), (-0.1, -0.5), (-0.14, -0.12 + tip)], None
        if side == "left":
            return [(0.62, -0.72), (0.3, -0.62), (0.05, -0.52), (-0.05, -0.35), (-0.06 + w, -0.12 + tip)], None
        return [(-0.3, -1.02), (-0.16, -0.66), (-0.08, -0.4), (-0.06 + w, -0.12 + tip)], None
    if kind == "pacemaker":
        sgn = SIDE_SIGN[side or "left"]
        if lateral:
            return [(-0.6, -0.56), (-0.35, -0.45), (-0.18, -0.1), (-0.3, 0.3 + tip)], (-0.62, -0.58, 0.03, 0.08)
        gen = (sgn * 0.46, -0.6, 0.08, 0.055)
        return [(sgn * 0.46, -0.6), (sgn * 0.2, -0.55), (-0.04, -0.3), (-0.02, 0.02), (0.14 + w, 0.24 + tip)], gen
    raise KeyError(kind)


def draw_finding(canvas: ViewCanvas, kind: str, side: str | None, sev: float, g: dict,
                 textures: TextureBank) -> list[tuple[str | None, Box]]:
    """Draw one finding on one view; returns ``[(side, canonical box)]`` where it is visible (may be empty)."""
    lateral = canvas.view == "LATERAL"
    a = canvas.anatomy
    out: list[tuple[str | None, Box | None]] = []
    if kind == "cardiomegaly":
        hrx, rv = canvas.extras["heart_rx"], canvas.extras["heart_ry"]
        cu, cv = (a["lat_heart_cu"], a["heart_cy"] + 0.12) if lateral else (a["heart_cx"], a["heart_cy"])
        bottom = min(cv + rv, _dome(a, "left", canvas.extras) + 0.1)
        out.append((None, (cu - hrx, cv - rv, cu + hrx, bottom)))
    elif kind == "widened_mediastinum":
        if not lateral:
            w = a["mediastinum_w"] + 0.02
            out.append((None, (-w, -0.65, w, -0.02)))
    elif kind == "pleural_effusion":
        if lateral:
            out.append((side, _effusion_lateral(canvas, sev, g["meniscus"], small=False)))
        else:
            out += [(s, _effusion_frontal(canvas, s, sev, g["meniscus"])) for s in _sides(side)]
    elif kind == "posterior_effusion":
        if lateral:
            out.append((side, _effusion_lateral(canvas, sev, g["meniscus"], small=True)))
    elif kind == "pneumothorax":
        if not lateral:
            out.append((side, _pneumothorax(canvas, side, sev)))
    elif kind in ("consolidation", "lung_opacity", "lung_lesion"):
        cu = g["z"] + a["lat_lung_cu"] if lateral else g["u"]
        if kind == "lung_lesion":
            r = 0.025 + 0.035 * sev if sev <= 0.55 else 0.06 + 0.09 * sev
            amp, edge, tex = 0.2 + 0.12 * sev, 0.35, (0.15 if sev > 0.55 else 0.0)
        elif kind == "consolidation":
            r, amp, edge, tex = 0.07 + 0.11 * sev, 0.1 + 0.16 * sev, 0.6, 0.35
        else:
            r, amp, edge, tex = 0.1 + 0.12 * sev, 0.06 + 0.09 * sev, 1.0, 0.4
        amp *= 0.85 if lateral else 1.0
        out.append((side, _blob(canvas, cu, g["v"], r * g["aspect"] ** 0.5, r / g["aspect"] ** 0.5, amp, edge,
                                textures, g["tex"], tex)))
    elif kind == "retrocardiac_consolidation":
        if lateral:
            sp = a["lat_spine_u"]
            out.append((side, _blob(canvas, sp - 0.2, a["lat_dome"] + 0.12, 0.13 + 0.05 * sev, 0.1 + 0.04 * sev,
                                    0.12 + 0.1 * sev, 0.6, textures, 17, 0.3)))
    elif kind == "edema":
        if lateral:
            out.append((side, _blob(canvas, 0.02, -0.02, 0.42, 0.4, 0.05 + 0.1 * sev, 1.5, textures, 3, 0.4)))
        else:
            boxes = [_blob(canvas, s * 0.3, -0.02, 0.3, 0.42, 0.05 + 0.11 * sev, 1.5, textures, 5, 0.4)
                     for s in (-1.0, 1.0)]
            boxes = [b for b in boxes if b is not None]
            if boxes:
                out.append(("bilateral", (min(b[0] for b in boxes), min(b[1] for b in boxes),
                                          max(b[2] for b in boxes), max(b[3] for b in boxes))))
    elif kind == "atelectasis":
        half, thick, amp = 0.1 + 0.1 * sev, 0.018 + 0.012 * sev, 0.14 + 0.1 * sev
        for s in _sides(side):
            if lateral:
                cu, cv = g["z"] + a["lat_lung_cu"], a["lat_dome"] + 0.02 - g["dv"] + (0.06 if s == "left" else 0)
            else:
                cu, cv = SIDE_SIGN[s] * g["u_abs"], _dome(a, s, canvas.extras) - g["dv"]
            out.append((s if not lateral else side, _band(canvas, cu, cv, half, thick, g["angle"], amp)))
            if lateral:
                break
    elif kind == "pleural_thickening":
        if not lateral:
            out.append((side, _pleural_rim(canvas, side, sev, g["v0"], g["v1"])))
    elif kind == "rib_fracture":
        if not lateral:
            out.append((side, _fracture(canvas, g, sev)))
    elif kind in ("endotracheal_tube", "nasogastric_tube", "central_line", "pacemaker"):
        points, gen = _device_points(kind, side, g, a, lateral)
        out.append((side, _device(canvas, points, 0.022 if kind != "pacemaker" else 0.014, 0.35, gen)))
    else:
        raise KeyError(f"unknown finding kind {kind!r}")
    return [(s, b) for s, b in out if b is not None]


def _pleural_rim(canvas: ViewCanvas, side: str, sev: float, v0: float, v1: float) -> Box | None:
    """Pleural thickening: a soft-tissue rim along the lateral chest wall, inside the lung edge."""
    a = canvas.anatomy
    sgn = SIDE_SIGN[side]
    lcx, lrx, lcy, lry = a["lung_cx"], a["lung_rx"], a["lung_cy"], a["lung_ry"]
    box = (min(sgn * (lcx + 0.2 * lrx), sgn * (lcx + lrx)), v0, max(sgn * (lcx + 0.2 * lrx), sgn * (lcx + lrx)), v1)
    win = canvas.window(box)
    if win is None:
        return None
    u, v = canvas.u[win], canvas.v[win]
    r2 = np.square((np.abs(u) - F32(lcx)) * F32(1 / lrx)) + np.square((v - F32(lcy)) * F32(1 / lry))
    rim = clip((r2 - F32((1.0 - 0.1 - 0.1 * sev) ** 2)) * F32(20), 0, 1) * (u * F32(sgn) > F32(lcx))
    rim *= clip((v - F32(v0)) * F32(20), 0, 1) * clip((F32(v1) - v) * F32(20), 0, 1)
    canvas.density[win] += rim * canvas.lung[win] * F32(0.26) - rim * canvas.markings[win]
    return box


def _fracture(canvas: ViewCanvas, g: dict, sev: float) -> Box | None:
    """Rib fracture: a lucent cortical break across the rib with a bright healing callus around it."""
    cu, cv = g["u"], g["v"]
    box = (cu - 0.07, cv - 0.06, cu + 0.07, cv + 0.06)
    win = canvas.window(box)
    if win is None:
        return None
    du, dv = canvas.u[win] - F32(cu), canvas.v[win] - F32(cv)
    callus = clip(F32(1) - (np.square(du * F32(1 / 0.05)) + np.square(dv * F32(1 / 0.035))), 0, 1)
    slope = g["slope"] * (1 if cu > 0 else -1)
    gap = clip(F32(1) - np.abs(du + dv * F32(slope)) * F32(1 / 0.008), 0, 1) * (np.abs(dv) < 0.03)
    canvas.density[win] += callus * F32(0.14 + 0.1 * sev) - gap * F32(0.15)
    return box
