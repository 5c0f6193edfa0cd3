"""Studies without label columns get CheXpert labels from rvl.nlp in ``rvl prepare`` (IU layout end to end)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rvl.cli import main as rvl_main
from rvl.constants import CHEXPERT_LABELS


@pytest.fixture(scope="module")
def iu_folder(tmp_path_factory) -> Path:
    """Phantom studies written in the IU X-ray / Open-i layout: reports and projections CSVs, no label columns."""
    from rvl.nlp import extract_sections
    from rvl.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("iu")
    frame = pd.read_parquet(generate_phantoms(root / "ph", 40, size=64, seed=5, fmt="png", progress=False))
    images = root / "iu" / "images" / "images_normalized"
    images.mkdir(parents=True)
    reports, projections = [], []
    for uid, row in enumerate(frame.itertuples(), start=1):
        sections = extract_sections(row.report)
        reports.append({"uid": uid, "indication": sections.get("indication", ""),
                        "findings": sections.get("findings", ""), "impression": sections.get("impression", "")})
        for k, (path, view) in enumerate(zip(row.image_paths, row.view_positions)):
            name = f"{uid}_IM-{k:04d}.dcm.png"
            os.symlink(Path(root / "ph" / path).resolve(), images / name)
            projections.append({"uid": uid, "filename": name, "projection": "Lateral" if "LAT" in view else "Frontal"})
    pd.DataFrame(reports).to_csv(root / "iu" / "indiana_reports.csv", index=False)
    pd.DataFrame(projections).to_csv(root / "iu" / "indiana_projections.csv", index=False)
    return root / "iu"


def test_prepare_labels_an_iu_folder_and_pretrain_uses_the_labels(iu_folder, tmp_path, capsys):
    from rvl.data import read_manifest

    cache = tmp_path / "cache"
    assert rvl_main(["prepare", str(iu_folder), "--out", str(cache), "--size", "64", "--workers", "1",
                     "--no-progress"]) == 0
    assert "studies from rvl.nlp@" in capsys.readouterr().out
    info = json.loads((cache / "prepare.json").read_text())
    assert list(info["labels"]["rows_by_source"]) == [next(iter(info["labels"]["rows_by_source"]))]
    source = next(iter(info["labels"]["rows_by_source"]))
    assert source.startswith("rvl.nlp@") and info["labels"]["rows_by_source"][source] == info["n_studies"]
    frame = read_manifest(cache)
    assert set(frame["label_source"]) == {source}
    values = frame[CHEXPERT_LABELS].to_numpy(float)
    assert (values == 1).sum() > 10 and (values == 0).sum() > 0  # real labels from the reports, negations included
    run = tmp_path / "run"
    assert rvl_main(["pretrain", "--data", str(cache), "--output-dir", str(run), "--model", "rvl-tiny",
                     "--label-aware-weight", "0.5", "--label-head-weight", "0.5", "--max-steps", "2",
                     "--batch-size", "8", "--eval-every", "2", "--log-with", "none", "--cpu"]) == 0
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert 0.0 <= best["zeroshot_macro_auc"] <= 1.0  # validation AUC needs labels: they reached the trainer


def test_manifest_labels_are_never_overwritten_and_modes(tmp_path):
    from rvl.data.labels import fill_labels

    frame = pd.DataFrame({"report": ["IMPRESSION: Large right pleural effusion.", "IMPRESSION: No pneumothorax.",
                                     ""], **{label: np.nan for label in CHEXPERT_LABELS}})
    frame.loc[0, "Pleural Effusion"] = 0.0  # the manifest says otherwise: it wins
    kept, summary = fill_labels(frame, "auto")
    assert kept["Pleural Effusion"].iloc[0] == 0.0 and summary["rows_by_source"] == {"manifest": 1, "none": 2}
    filled, summary = fill_labels(frame, "nlp")
    assert filled["Pleural Effusion"].iloc[0] == 0.0 and filled["Pneumothorax"].iloc[1] == 0.0
    assert list(filled["label_source"])[0] == "manifest" and list(filled["label_source"])[1].startswith("rvl.nlp@")
    assert filled["label_source"].iloc[2] == ""  # no report text: nothing to label, stays blank
    blank, _ = fill_labels(frame, "none")
    assert np.isnan(blank[CHEXPERT_LABELS].to_numpy(float)).all()
    with pytest.raises(ValueError, match="--labels must be one of"):
        fill_labels(frame, "guess")


def test_a_rerun_reads_no_report_again_and_a_damaged_memo_is_not_used(iu_folder, tmp_path, caplog):
    """The label memo: a second ``rvl prepare`` labels nothing (same labels), a grown archive labels only its new
    reports, and a memo that fails its checksum is ignored (every report labelled again, same labels)."""
    import logging

    from rvl.data import prepare, read_manifest
    from rvl.data.labels import MEMO_NAME
    from rvl.faults import flip_bytes

    first = prepare(iu_folder, tmp_path / "cache", size=64, workers=0, progress=False)
    distinct = first["labels"]["reports_read_by_labeler"]
    assert 0 < distinct <= first["n_studies"] and (tmp_path / "cache" / MEMO_NAME).is_file()
    labels = read_manifest(tmp_path / "cache")[CHEXPERT_LABELS].to_numpy(float)
    again = prepare(iu_folder, tmp_path / "cache", size=64, workers=0, progress=False)
    assert again["labels"]["reports_read_by_labeler"] == 0 and again["up_to_date"]
    assert np.array_equal(read_manifest(tmp_path / "cache")[CHEXPERT_LABELS].to_numpy(float), labels, equal_nan=True)

    frame = read_manifest(iu_folder)
    grown = frame.copy()
    grown.loc[0, "report"] = "FINDINGS: Large right pleural effusion. IMPRESSION: Right effusion."
    grown_run = prepare(grown, tmp_path / "cache", size=64, workers=0, progress=False)
    assert grown_run["labels"]["reports_read_by_labeler"] == 1
    assert read_manifest(tmp_path / "cache").loc[0, "Pleural Effusion"] == 1

    flip_bytes(tmp_path / "cache" / MEMO_NAME, seed=1)
    with caplog.at_level(logging.WARNING, logger="rvl.data.labels"):
        damaged = prepare(iu_folder, tmp_path / "cache", size=64, workers=0, progress=False)
    assert "label memo unusable" in caplog.text and MEMO_NAME in caplog.text
    assert damaged["labels"]["reports_read_by_labeler"] == distinct
    assert np.array_equal(read_manifest(tmp_path / "cache")[CHEXPERT_LABELS].to_numpy(float), labels, equal_nan=True)
