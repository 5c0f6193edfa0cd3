"""``generate_phantoms``: patients -> study timelines -> images + reports + ground truth -> manifest.

Determinism: everything about patient ``i`` comes from ``numpy.random.default_rng([seed, i])`` (its study count from
``[seed, i, 1]``, the split from one permutation seeded by ``[seed, 2]``), and textures from a seed-derived bank that
every worker rebuilds identically, so the output is the same for any ``workers``.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from .anatomy import TextureBank, finish_image, render_frontal, render_lateral, sample_anatomy, sample_pose
from .findings import apply_to_anatomy, draw_finding, lesion_name, sample_geometry
from .report import ReportItem, load_catalogue, write_report

__all__ = ["generate_phantoms", "plan_patients", "render_patient"]

log = logging.getLogger(__name__)
_FORMATS = ("png", "dicom", "both")
_CHRONIC_ANATOMY = ("cardiomegaly", "widened_mediastinum")


def _weighted(rng: np.random.Generator, options: dict) -> str:
    keys = list(options)
    weights = np.array([float(options[k]) for k in keys])
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def _word(spec: dict, sev: float) -> str:
    for threshold, word in spec["words"]:
        if sev <= threshold + 1e-9:
            return word
    return spec["words"][-1][1]


def plan_patients(n_studies: int, seed: int) -> list[int]:
    """Studies per patient (1-4 each, last one truncated) so that the total is exactly ``n_studies``."""
    dist = load_catalogue()["studies_per_patient"]
    counts, total, i = [], 0, 0
    keys = sorted(int(k) for k in dist)
    probs = np.array([float(dist[k]) for k in keys])
    while total < n_studies:
        k = keys[int(np.random.default_rng([seed, i, 1]).choice(len(keys), p=probs / probs.sum()))]
        k = min(k, n_studies - total)
        counts.append(k)
        total += k
        i += 1
    return counts


def _assign_splits(n_patients: int, seed: int) -> list[str]:
    """~80/10/10 train/validate/test by patient (each non-empty once there are >= 3 patients)."""
    n_val = n_test = int(round(0.1 * n_patients))
    if n_patients >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    order = np.random.default_rng([seed, 2]).permutation(n_patients)
    splits = ["train"] * n_patients
    for rank, idx in enumerate(order):
        if rank < n_test:
            splits[idx] = "test"
        elif rank < n_test + n_val:
            splits[idx] = "validate"
    return splits


def _timeline(rng: np.random.Generator, n: int, anatomy: dict) -> list[dict]:
    """Studies of one patient: date, views, ICU state and the severity of every finding process at that time."""
    cat = load_catalogue()
    kinds = cat["kinds"]
    date = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 14 * 365)))
    procs: dict[str, dict] = {}
    for kind, spec in kinds.items():
        if spec["course"] == "chronic" and rng.random() < spec["onset"]:
            first = 0 if rng.random() < 0.75 else int(rng.integers(0, max(1, n)))
            side = _weighted(rng, spec["sides"]) if spec["sides"] else None
            procs[kind] = {"side": side, "geom": sample_geometry(kind, side, anatomy, rng), "first": first,
                           "sev": float(rng.uniform(*spec["severity"])), "active": False}
    studies, icu = [], False
    for k in range(n):
        if k:
            date += dt.timedelta(days=int(rng.integers(1, 6) if icu else rng.integers(7, 500)))
        icu = rng.random() < (cat["icu_episode"]["stay"] if icu else cat["icu_episode"]["start"])
        view = "AP" if icu or rng.random() < cat["ap_view"]["outpatient"] else "PA"
        has_lateral = bool(rng.random() < cat["lateral_view"][view])
        state: dict[str, float] = {}
        for kind, spec in kinds.items():
            proc = procs.get(kind)
            if spec["course"] == "chronic":
                if proc and k >= proc["first"]:
                    if proc["active"] and spec["evolves"] and rng.random() < 0.2:
                        proc["sev"] = float(min(1.0, proc["sev"] + rng.uniform(0.1, 0.3)))
                    proc["active"] = True
                    state[kind] = proc["sev"]
                continue
            active = bool(proc and proc["active"])
            if spec["course"] == "icu":
                on = (rng.random() < 0.85) if active else (icu and rng.random() < spec["onset"])
                on = on and icu
            elif active:
                r = rng.random()
                if not spec["evolves"]:
                    on = r < 0.6
                elif r < 0.35:
                    on = True
                elif r < 0.57:
                    on, proc["sev"] = True, float(min(1.0, proc["sev"] + rng.uniform(0.15, 0.35)))
                elif r < 0.8:
                    on, proc["sev"] = True, float(max(0.1, proc["sev"] - rng.uniform(0.15, 0.35)))
                else:
                    on = False
            else:
                on = rng.random() < spec["onset"] * (1.6 if icu else 1.0)
            if on and not active:
                side = _weighted(rng, spec["sides"]) if spec["sides"] else None
                procs[kind] = proc = {"side": side, "geom": sample_geometry(kind, side, anatomy, rng),
                                      "sev": float(rng.uniform(*spec["severity"])), "active": True}
            if proc is not None:
                proc["active"] = on
            if on:
                state[kind] = proc["sev"]
        studies.append({"date": date.isoformat(), "view": view, "has_lateral": has_lateral, "icu": icu,
                        "state": state, "procs": {kind: procs[kind] for kind in state}})
    return studies


def _report_slots(kind: str, proc: dict, sev: float) -> dict:
    g = proc["geom"]
    slots: dict = {}
    if "zone" in g:
        slots["zone_key"] = g["zone"]
    if kind == "lung_lesion":
        slots.update(mass=sev > 0.55, mm=int(round(4 + 26 * sev / 0.55)), cm=f"{3 + 5 * (sev - 0.55) / 0.45:.1f}")
    if kind == "rib_fracture":
        slots["rib"] = {-0.4: "5th", -0.25: "6th", -0.1: "7th", 0.05: "8th"}[min((-0.4, -0.25, -0.1, 0.05),
                                                                               key=lambda x: abs(x - g["v"]))]
    if kind in ("endotracheal_tube", "central_line", "nasogastric_tube", "pacemaker"):
        slots["tip_cm"] = f"{max(1.5, 4.5 - 25 * g['tip']):.1f}".rstrip("0").rstrip(".")
    return slots


def render_patient(index: int, n_studies: int, seed: int, size: int, split: str, out_dir: Path, fmt: str,
                   monochrome1_fraction: float, textures: TextureBank) -> list[dict]:
    """Generate, draw and write every study of one patient; returns its manifest rows."""
    from .writer import write_dicom, write_png

    kinds = load_catalogue()["kinds"]
    rng = np.random.default_rng([seed, index])
    render_size = max(64, size // 2)
    patient_id = f"p{index:06d}"
    anatomy = sample_anatomy(rng)
    studies = _timeline(rng, n_studies, anatomy)
    bases: dict[tuple, object] = {}
    rows, reported_prev, prior_date = [], {}, None
    for k, study in enumerate(studies):
        study_id = f"{patient_id}_s{k + 1}"
        views = [study["view"]] + (["LATERAL"] if study["has_lateral"] else [])
        chronic = {kind: sev for kind, sev in study["state"].items() if kind in _CHRONIC_ANATOMY}
        anat = apply_to_anatomy(anatomy, chronic)
        images, view_boxes, visible_in = [], [], {}
        for view in views:
            key = (view, anat["heart_rx"], anat["mediastinum_w"])
            if key not in bases:
                bases[key] = (render_lateral(render_size, anat, textures) if view == "LATERAL"
                              else render_frontal(render_size, anat, textures, view))
            canvas = bases[key].copy()
            pose, exposure = sample_pose(rng, view)
            boxes = []
            for kind, sev in study["state"].items():
                spec, proc = kinds[kind], study["procs"][kind]
                if spec.get("lateral_only") and not study["has_lateral"]:
                    continue
                for side, box in draw_finding(canvas, kind, proc["side"], sev, proc["geom"], textures):
                    image_box = pose.box_to_image(box)
                    if image_box is None:
                        continue
                    name = lesion_name(sev) if kind == "lung_lesion" else spec["finding"]
                    boxes.append({"label": spec["label"], "finding": name, "side": side, "box": image_box})
                    visible_in.setdefault(kind, [])
                    if view not in visible_in[kind]:
                        visible_in[kind].append(view)
            images.append(finish_image(canvas.density, pose, exposure, textures, rng, size))
            view_boxes.append(boxes)
        # What the reader reports: visible findings, plus resolution of what the prior report described.
        items, findings = [], []
        for kind, sev in study["state"].items():
            if kind not in visible_in:
                continue
            spec, proc = kinds[kind], study["procs"][kind]
            prev = reported_prev.get(kind)
            change = None
            if prior_date is not None:
                change = ("new" if prev is None else "unchanged" if abs(prev - sev) < 0.05 or not spec["evolves"]
                          else "increased" if sev > prev else "improved")
            hedged = bool(sev < spec["hedge_below"] and rng.random() < spec["p_hedge"])
            items.append(ReportItem(kind, spec["label"], proc["side"], sev, _word(spec, sev), change, hedged,
                                    _report_slots(kind, proc, sev)))
            findings.append({"label": spec["label"], "finding": lesion_name(sev) if kind == "lung_lesion"
                             else spec["finding"], "side": proc["side"], "severity": _word(spec, sev) or "present",
                             "severity_score": round(sev, 3), "views": visible_in[kind],
                             "lateral_only": bool(spec.get("lateral_only", False)), "uncertain": hedged,
                             "change": change, "kind": kind})
        for kind, prev in reported_prev.items():
            if kind not in study["state"]:  # gone (not merely invisible on this study's views)
                spec = kinds[kind]
                proc_side = studies[k - 1]["procs"][kind]["side"]
                items.append(ReportItem(kind, spec["label"], proc_side, prev, _word(spec, prev), "resolved", False,
                                        _report_slots(kind, studies[k - 1]["procs"][kind], prev)))
        report, labels = write_report(items, rng, study["view"], study["has_lateral"], prior_date, study["icu"])
        # Write images.
        study_dir = out_dir / "images" / patient_id / study_id
        os.makedirs(study_dir, exist_ok=True)
        paths, dicom_paths = [], []
        for j, (view, pixels) in enumerate(zip(views, images)):
            if fmt in ("png", "both"):
                write_png(study_dir / f"{view}.png", pixels)
                paths.append(f"images/{patient_id}/{study_id}/{view}.png")
            if fmt in ("dicom", "both"):
                from pydicom.uid import generate_uid

                mono1 = bool(rng.random() < monochrome1_fraction)
                modality = "CR" if view == "LATERAL" or study["view"] == "PA" else "DX"
                uid = [str(seed), patient_id, study_id]
                write_dicom(study_dir / f"{view}.dcm", pixels, {
                    "patient_id": patient_id, "patient_sex": anatomy["sex"], "patient_age": anatomy["age"],
                    "study_uid": generate_uid(entropy_srcs=uid), "series_uid": generate_uid(entropy_srcs=uid + [view]),
                    "sop_uid": generate_uid(entropy_srcs=uid + [view, "sop"]), "study_date": study["date"],
                    "study_id": study_id, "series_number": j + 1, "view": view, "modality": modality,
                    "monochrome1": mono1, "intercept": -1024.0 if modality == "DX" else 0.0})
                dicom_paths.append(f"images/{patient_id}/{study_id}/{view}.dcm")
        row = {"patient_id": patient_id, "study_id": study_id, "study_date": study["date"], "split": split,
               "image_paths": paths or dicom_paths, "view_positions": views, "report": report, **labels,
               "finding_boxes": json.dumps(view_boxes), "findings": json.dumps(findings)}
        if fmt == "both":
            row["dicom_paths"] = dicom_paths
        rows.append(row)
        reported_prev = {kind: study["state"][kind] for kind in visible_in}
        prior_date = study["date"]
    return rows


_WORKER: dict = {}


def _worker_init(seed: int, size: int) -> None:
    key = (seed, size)
    if _WORKER.get("key") != key:  # reuse the bank across calls in one process (tests, notebooks)
        _WORKER["textures"], _WORKER["key"] = TextureBank(seed, size, max(64, size // 2)), key


def _worker_run(args: tuple) -> list[dict]:
    index, n, seed, size, split, out_dir, fmt, mono1 = args
    return render_patient(index, n, seed, size, split, Path(out_dir), fmt, mono1, _WORKER["textures"])


def generate_phantoms(out_dir: str | Path, n_studies: int, size: int = 256, seed: int = 0, fmt: str = "png",
                      preview: bool = False, monochrome1_fraction: float = 0.0, workers: int = 1,
                      progress: bool = True) -> Path:
    """Generate ``n_studies`` synthetic chest-radiograph studies with reports and ground truth.

    Args:
        out_dir: output directory (created); images go to ``out_dir/images/<patient>/<study>/<view>.{png,dcm}``.
        n_studies: total number of studies (patients have 1-4 studies each).
        size: image side in pixels (square images).
        seed: everything is a deterministic function of the seed (independent of ``workers``).
        fmt: "png", "dicom" or "both" (then ``image_paths`` are the PNGs and ``dicom_paths`` the DICOM files).
        preview: also write ``out_dir/preview.png``, a contact sheet of the first studies with their impressions.
        monochrome1_fraction: fraction of DICOM images stored as MONOCHROME1 (inverted grey scale).
        workers: processes; patients are distributed in chunks, the output is identical for any value.
        progress: show a tqdm progress bar.

    Returns:
        Path of ``manifest.parquet`` (``manifest.csv`` is written next to it).
    """
    from tqdm.auto import tqdm

    from .writer import write_contact_sheet, write_manifest

    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
    if int(n_studies) < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if int(size) < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 0.0 <= float(monochrome1_fraction) <= 1.0:
        raise ValueError(f"monochrome1_fraction must be in [0, 1], got {monochrome1_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = plan_patients(int(n_studies), int(seed))
    splits = _assign_splits(len(counts), int(seed))
    jobs = [(i, n, int(seed), int(size), splits[i], str(out), fmt, float(monochrome1_fraction))
            for i, n in enumerate(counts)]
    rows: list[dict] = []
    bar = tqdm(total=int(n_studies), unit="study", desc="phantoms", disable=not progress)
    if workers <= 1:
        _worker_init(int(seed), int(size))
        for job in jobs:
            rows += _worker_run(job)
            bar.update(job[1])
    else:
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        chunk = max(1, min(64, math.ceil(len(jobs) / (workers * 8))))
        with mp.get_context(method).Pool(workers, initializer=_worker_init, initargs=(int(seed), int(size))) as pool:
            for job_rows in pool.imap(_worker_run, jobs, chunksize=chunk):  # imap keeps patient order
                rows += job_rows
                bar.update(len(job_rows))
    bar.close()
    manifest = write_manifest(rows, out)
    if preview:
        write_contact_sheet(rows, out, out / "preview.png")
    log.info("wrote %d studies of %d patients to %s", len(rows), len(counts), out)
    return manifest
