"""rvl phantoms: determinism, splits, labels vs ground truth, boxes, lateral-only findings, DICOM, CXR look, CLI."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rvl.constants import CHEXPERT_LABELS
from rvl.phantoms import generate_phantoms

N_STUDIES = 90
SEED = 3
FRONTAL = ("PA", "AP")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, N_STUDIES, size=128, seed=SEED, fmt="both", monochrome1_fraction=0.5, progress=False)
    return out


@pytest.fixture(scope="module")
def manifest(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "manifest.parquet")


def _pixels(run_dir: Path, rel: str) -> np.ndarray:
    with Image.open(run_dir / rel) as im:
        return np.asarray(im)


def test_manifest_schema_and_csv_agree(run_dir, manifest):
    assert len(manifest) == N_STUDIES
    for col in ["patient_id", "study_id", "study_date", "split", "image_paths", "view_positions", "report",
                *CHEXPERT_LABELS, "finding_boxes", "findings"]:
        assert col in manifest.columns, col
    assert manifest["study_id"].is_unique
    csv = pd.read_csv(run_dir / "manifest.csv")
    assert list(csv["study_id"]) == list(manifest["study_id"])
    for parquet_paths, csv_paths in zip(manifest["image_paths"], csv["image_paths"]):
        assert list(parquet_paths) == json.loads(csv_paths)
    np.testing.assert_array_equal(csv[CHEXPERT_LABELS].to_numpy(), manifest[CHEXPERT_LABELS].to_numpy())
    for _, row in manifest.iterrows():
        assert len(row.image_paths) == len(row.view_positions) == len(json.loads(row.finding_boxes))
        assert row.view_positions[0] in FRONTAL and set(row.view_positions[1:]) <= {"LATERAL"}
        assert all((run_dir / p).is_file() for p in row.image_paths)
        assert all((run_dir / p).is_file() for p in row.dicom_paths)
        assert "FINDINGS" in row.report.upper() and ("IMPRESSION" in row.report.upper()
                                                     or "CONCLUSION" in row.report.upper())
        assert set(np.unique(row[CHEXPERT_LABELS].to_numpy(dtype=float)[~np.isnan(
            row[CHEXPERT_LABELS].to_numpy(dtype=float))])) <= {1.0, 0.0, -1.0}
    # Dates increase within a patient; most studies have a lateral view; a realistic share is normal.
    for _, group in manifest.groupby("patient_id"):
        assert list(group["study_date"]) == sorted(group["study_date"])
        assert group["study_date"].is_unique
    assert (manifest["view_positions"].map(len) == 2).mean() > 0.5
    assert 0.15 < (manifest["No Finding"] == 1).mean() < 0.7


def test_same_seed_identical_any_worker_count_and_other_seed_differs(tmp_path, run_dir, manifest):
    again = tmp_path / "again"
    generate_phantoms(again, N_STUDIES, size=128, seed=SEED, fmt="both", monochrome1_fraction=0.5, workers=2,
                      progress=False)
    other = pd.read_parquet(again / "manifest.parquet")
    pd.testing.assert_frame_equal(manifest, other)
    for rel in manifest["image_paths"].explode():
        assert (run_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    different = tmp_path / "different"
    generate_phantoms(different, 10, size=128, seed=SEED + 1, progress=False)
    other_seed = pd.read_parquet(different / "manifest.parquet")
    assert list(other_seed["report"]) != list(manifest["report"][:10])
    rel = other_seed["image_paths"][0][0]
    assert not np.array_equal(_pixels(different, rel), _pixels(run_dir, manifest["image_paths"][0][0]))


def test_splits_are_by_patient(manifest):
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    counts = manifest.drop_duplicates("patient_id")["split"].value_counts()
    assert set(counts.index) == {"train", "validate", "test"}
    assert counts["train"] > counts["validate"] and counts["train"] > counts["test"]


def test_labels_follow_from_ground_truth(manifest):
    n_uncertain = n_negative = 0
    for _, row in manifest.iterrows():
        findings = json.loads(row.findings)
        present = {f["label"] for f in findings}
        for f in findings:
            value = row[f["label"]]
            if f["uncertain"]:
                assert value in (1.0, -1.0), (row.study_id, f)
            else:
                assert value == 1.0, (row.study_id, f, row.report)
        for label in CHEXPERT_LABELS[1:]:
            value = row[label]
            if value == 0.0:
                n_negative += 1
                assert label not in present, (row.study_id, label)  # never negate what is drawn
            if value == -1.0:
                n_uncertain += 1
            if math.isnan(value):
                assert label not in present, (row.study_id, label)
        abnormal = [lab for lab in CHEXPERT_LABELS[1:-1] if row[lab] in (1.0, -1.0)]
        if abnormal:
            assert math.isnan(row["No Finding"])
        else:
            assert row["No Finding"] == 1.0
            assert {f["label"] for f in findings} <= {"Support Devices"}
    assert n_uncertain > 0 and n_negative > 0


def test_reports_compare_with_prior(manifest):
    followups = manifest[manifest.duplicated("patient_id", keep="first")]
    assert len(followups) > 0
    change_words = ("unchanged", "stable", "new", "increase", "improv", "decreas", "resolv", "persistent",
                    "interval", "prior", "removal")
    with_change = [r for r in followups["report"] if any(w in r.lower() for w in change_words)]
    assert len(with_change) >= 0.3 * len(followups)
    assert all("prior" not in json.loads(f) for f in manifest["findings"])


def test_boxes_normalised_and_on_the_correct_side(manifest):
    n_checked = 0
    for _, row in manifest.iterrows():
        for view, boxes in zip(row.view_positions, json.loads(row.finding_boxes)):
            for b in boxes:
                x0, y0, x1, y1 = b["box"]
                assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0, b
                assert b["label"] in CHEXPERT_LABELS
                if view in FRONTAL and b["side"] in ("left", "right") and b["label"] != "Support Devices":
                    centre = (x0 + x1) / 2
                    # Radiological convention: the patient's left is on the image right.
                    assert (centre > 0.5) == (b["side"] == "left"), (row.study_id, b)
                    n_checked += 1
    assert n_checked > 5


def test_lateral_only_findings_have_no_frontal_box(manifest):
    n_lateral_only = 0
    for _, row in manifest.iterrows():
        findings = json.loads(row.findings)
        boxes = json.loads(row.finding_boxes)
        for f in findings:
            if not f["lateral_only"]:
                continue
            n_lateral_only += 1
            assert f["views"] == ["LATERAL"]
            others = [g for g in findings if g["label"] == f["label"] and not g["lateral_only"]]
            lateral = boxes[list(row.view_positions).index("LATERAL")]
            assert any(b["label"] == f["label"] for b in lateral)
            if not others:
                for view, view_boxes in zip(row.view_positions, boxes):
                    if view in FRONTAL:
                        assert all(b["label"] != f["label"] for b in view_boxes), row.study_id
    assert n_lateral_only > 0


def test_drawn_findings_lie_inside_their_boxes():
    """Every finding kind changes the image only inside the box it reports (and nothing where it reports none)."""
    from rvl.phantoms.anatomy import TextureBank, render_frontal, render_lateral, sample_anatomy
    from rvl.phantoms.findings import apply_to_anatomy, draw_finding, sample_geometry
    from rvl.phantoms.report import load_catalogue

    size = 128
    textures = TextureBank(0, 2 * size, size)
    rng = np.random.default_rng(0)
    anatomy = sample_anatomy(rng)
    for kind, spec in load_catalogue()["kinds"].items():
        sides = list(spec["sides"]) if spec["sides"] else [None]
        for side in sides:
            sev = 0.8
            anat = apply_to_anatomy(anatomy, {kind: sev} if kind in ("cardiomegaly", "widened_mediastinum") else {})
            geom = sample_geometry(kind, side, anat, rng)
            for view in ("PA", "LATERAL"):
                base = render_lateral(size, anat, textures) if view == "LATERAL" else render_frontal(size, anat,
                                                                                                    textures)
                canvas = base.copy()
                boxes = draw_finding(canvas, kind, side, sev, geom, textures)
                diff = np.abs(canvas.density - base.density)
                visible = ("lateral" if view == "LATERAL" else "frontal") in spec["views"]
                assert bool(boxes) == visible, (kind, side, view)
                if kind in ("cardiomegaly", "widened_mediastinum") or not boxes:
                    assert diff.sum() == 0  # anatomy changes happen before drawing; invisible = untouched
                    continue
                inside = np.zeros_like(diff, dtype=bool)
                for _, (u0, v0, u1, v1) in boxes:
                    inside |= (canvas.u >= u0 - 0.02) & (canvas.u <= u1 + 0.02) & (canvas.v >= v0 - 0.02) & (
                        canvas.v <= v1 + 0.02)
                assert diff.sum() > 0, (kind, view)
                assert diff[inside].sum() >= 0.9 * diff.sum(), (kind, side, view)


def test_dicom_tags_and_monochrome1_inversion(run_dir, manifest):
    import pydicom

    photometric = set()
    for _, row in manifest.head(25).iterrows():
        for png_rel, dcm_rel, view in zip(row.image_paths, row.dicom_paths, row.view_positions):
            ds = pydicom.dcmread(run_dir / dcm_rel)
            assert ds.PatientID == row.patient_id
            assert ds.StudyDate == row.study_date.replace("-", "")
            assert ds.ViewPosition == ("LL" if view == "LATERAL" else view)
            assert ds.Modality in ("CR", "DX") and ds.BitsStored == 12 and ds.BitsAllocated == 16
            for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
                assert pydicom.uid.UID(uid).is_valid
            assert float(ds.RescaleSlope) == 1.0 and float(ds.WindowWidth) > 0
            float(ds.RescaleIntercept), float(ds.WindowCenter)  # present and numeric
            stored = ds.pixel_array.astype(np.int32)
            display = np.round(_pixels(run_dir, png_rel).astype(np.float64) * 4095 / 255).astype(np.int32)
            photometric.add(ds.PhotometricInterpretation)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                np.testing.assert_array_equal(stored, 4095 - display)
            else:
                assert ds.PhotometricInterpretation == "MONOCHROME2"
                np.testing.assert_array_equal(stored, display)
            assert stored.max() <= 4095
        # One study: the same StudyInstanceUID for its views, distinct series/instances.
        uids = [pydicom.dcmread(run_dir / p, stop_before_pixels=True) for p in row.dicom_paths]
        assert len({d.StudyInstanceUID for d in uids}) == 1
        assert len({d.SOPInstanceUID for d in uids}) == len(uids)
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_images_look_like_chest_radiographs(run_dir, manifest):
    """Frontal: lungs darker than the mediastinum and the upper abdomen; air outside the body darkest."""
    normal = manifest[manifest["No Finding"] == 1.0]
    assert len(normal) >= 5
    for _, row in normal.iterrows():
        img = _pixels(run_dir, row.image_paths[0]).astype(np.float64)
        s = img.shape[0]
        patch = lambda x, y, r=0.05: img[int((y - r) * s):int((y + r) * s), int((x - r) * s):int((x + r) * s)].mean()
        lungs = (patch(0.28, 0.38) + patch(0.72, 0.38)) / 2
        mediastinum = patch(0.5, 0.35, 0.03)
        assert lungs + 25 < mediastinum, row.study_id
        assert lungs + 25 < patch(0.5, 0.88)
        assert img[:, :2].mean() < lungs
        if len(row.image_paths) > 1:
            lat = _pixels(run_dir, row.image_paths[1]).astype(np.float64)
            lat_lung = lat[int(0.3 * s):int(0.45 * s), int(0.42 * s):int(0.58 * s)].mean()
            assert lat_lung + 15 < lat[int(0.85 * s):int(0.95 * s), int(0.4 * s):int(0.6 * s)].mean()


def test_png_encoder_round_trip():
    from rvl.phantoms.writer import encode_png

    pixels = np.random.default_rng(0).integers(0, 256, size=(37, 53), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
    np.testing.assert_array_equal(decoded, pixels)
    with pytest.raises(ValueError):
        encode_png(pixels.astype(np.float32))


def test_cli_writes_preview_and_rejects_bad_input(tmp_path, capsys):
    from rvl.cli import main

    out = tmp_path / "cli"
    assert main(["phantoms", "--out", str(out), "--studies", "7", "--size", "96", "--preview", "--no-progress"]) == 0
    with Image.open(out / "preview.png") as sheet:
        assert sheet.mode == "RGB" and sheet.width > 300 and sheet.height > 150
        assert np.asarray(sheet).std() > 10
    assert len(pd.read_parquet(out / "manifest.parquet")) == 7
    dicom_only = tmp_path / "dicom"
    assert main(["phantoms", "--out", str(dicom_only), "--studies", "3", "--size", "64", "--format", "dicom",
                 "--monochrome1-fraction", "1", "--preview", "--no-progress"]) == 0
    frame = pd.read_parquet(dicom_only / "manifest.parquet")
    assert all(p.endswith(".dcm") and (dicom_only / p).is_file() for p in frame["image_paths"].explode())
    assert (dicom_only / "preview.png").is_file()
    assert main(["phantoms", "--out", str(out), "--studies", "0"]) == 2
    assert "--studies" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fmt"):
        generate_phantoms(out, 2, fmt="jpeg")
