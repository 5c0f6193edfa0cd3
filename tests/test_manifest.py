"""Study manifests: the rvl manifest in every container, and converters from fixture files in the public layouts."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rvl.constants import CHEXPERT_LABELS
from rvl.data import ManifestError, read_manifest
from rvl.data.manifest import MANIFEST_COLUMNS, detect_format, write_manifest


def write_png(path: Path, value: int = 128, shape: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def rvl_frame(tmp_path: Path) -> pd.DataFrame:
    write_png(tmp_path / "images" / "s1_pa.png")
    write_png(tmp_path / "images" / "s1_lat.png")
    write_png(tmp_path / "images" / "s2_ap.png")
    labels = {label: np.nan for label in CHEXPERT_LABELS}
    return pd.DataFrame([
        {"patient_id": "p1", "study_id": "s1", "study_date": "2020-01-02", "split": "train",
         "image_paths": ["images/s1_pa.png", "images/s1_lat.png"], "view_positions": ["PA", "LATERAL"],
         "report": "FINDINGS: Small left effusion.\nIMPRESSION: Effusion.", **labels, "Pleural Effusion": 1.0,
         "finding_boxes": json.dumps([[{"label": "Pleural Effusion", "finding": "pleural effusion", "side": "left",
                                        "box": [0.6, 0.6, 0.9, 0.9]}], []]), "findings": "[]"},
        {"patient_id": "p2", "study_id": "s2", "study_date": "2020-03-04", "split": "test",
         "image_paths": ["images/s2_ap.png"], "view_positions": ["AP"], "report": "IMPRESSION: Normal.",
         **labels, "No Finding": 1.0, "finding_boxes": "[[]]", "findings": "[]"},
    ])


def assert_same_manifest(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) == MANIFEST_COLUMNS
    for col in MANIFEST_COLUMNS:
        for x, y in zip(a[col], b[col]):
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (col, x, y)


def test_rvl_manifest_reads_the_same_from_parquet_csv_jsonl_and_hf_datasets(tmp_path):
    import datasets

    frame = rvl_frame(tmp_path)
    write_manifest(frame, tmp_path)
    from_parquet = read_manifest(tmp_path / "manifest.parquet")
    assert from_parquet["image_paths"][0] == [str(tmp_path / "images" / "s1_pa.png"), str(tmp_path / "images" /
                                                                                          "s1_lat.png")]
    assert from_parquet["view_positions"][0] == ["PA", "LATERAL"]
    assert from_parquet["Pleural Effusion"][0] == 1.0 and math.isnan(from_parquet["Edema"][0])
    frame.to_json(tmp_path / "manifest.jsonl", orient="records", lines=True)
    datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(tmp_path / "hf"))
    for other in (read_manifest(tmp_path / "manifest.csv"), read_manifest(tmp_path / "manifest.jsonl"),
                  read_manifest(tmp_path)):
        assert_same_manifest(from_parquet, other)
    frame["dicom_paths"] = [["images/s1_pa.dcm", "images/s1_lat.dcm"], ["images/s2_ap.dcm"]]
    write_manifest(frame, tmp_path / "both")
    both = read_manifest(tmp_path / "both" / "manifest.csv")
    assert both["dicom_paths"][1] == [str(tmp_path / "both" / "images" / "s2_ap.dcm")]  # extra path lists too
    as_dicom = read_manifest(tmp_path / "both" / "manifest.parquet", image_column="dicom_paths")
    assert as_dicom["image_paths"][1] == both["dicom_paths"][1] and as_dicom["view_positions"][1] == ["AP"]
    hf = read_manifest(tmp_path / "hf")  # relative paths resolve against the dataset folder
    assert hf["image_paths"][1] == [str(tmp_path / "hf" / "images" / "s2_ap.png")]


def test_bad_manifests_name_the_file_and_row(tmp_path):
    frame = rvl_frame(tmp_path)
    frame.drop(columns="image_paths").to_csv(tmp_path / "no_paths.csv", index=False)
    with pytest.raises(ManifestError, match=r"no_paths\.csv.*image_paths"):
        read_manifest(tmp_path / "no_paths.csv", format="rvl")
    bad = frame.copy()
    bad.at[1, "view_positions"] = ["AP", "LATERAL"]
    bad.to_parquet(tmp_path / "misaligned.parquet")
    with pytest.raises(ManifestError, match=r"misaligned\.parquet: row 1 \(study s2\): 1 image_paths but 2"):
        read_manifest(tmp_path / "misaligned.parquet")
    pd.concat([frame, frame]).to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(ManifestError, match="duplicate study_id 's1'"):
        read_manifest(tmp_path / "dup.parquet")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.parquet")
    write_manifest(frame, tmp_path)
    with pytest.raises(ManifestError, match=r"\['reports'\] do not apply to the 'rvl' format"):
        read_manifest(tmp_path / "manifest.parquet", reports="r.csv")
    with pytest.raises(ManifestError, match="unknown manifest format 'nih'"):
        read_manifest(tmp_path / "manifest.parquet", format="nih")


def test_minimal_manifest_gets_defaults_and_patient_level_splits(tmp_path):
    rows = [{"patient_id": f"p{i // 3}", "study_id": f"s{i}", "image_paths": json.dumps([f"x{i}.png"])}
            for i in range(300)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    frame = read_manifest(tmp_path / "m.csv", format="rvl")
    assert frame["view_positions"][0] == ["OTHER"] and frame["report"][0] == "" and frame["finding_boxes"][0] == "[[]]"
    assert frame.groupby("patient_id")["split"].nunique().max() == 1  # all studies of a patient share a split
    counts = frame.drop_duplicates("patient_id")["split"].value_counts()
    assert set(counts.index) == {"train", "validate", "test"} and counts["train"] > counts["test"]


# --------------------------------------------------------------------------------------------------- MIMIC-CXR-JPG
def test_mimic_cxr_jpg_metadata_reports_splits_and_labels(tmp_path):
    meta = pd.DataFrame({
        "dicom_id": ["d1", "d2", "d3", "d4"], "subject_id": [10000032, 10000032, 10000032, 11000011],
        "study_id": [50414267, 50414267, 53189527, 56699142],
        "PerformedProcedureStepDescription": ["CHEST (PA AND LAT)"] * 4,
        "ViewPosition": ["PA", "LATERAL", "AP", np.nan], "Rows": [3056] * 4, "Columns": [2544] * 4,
        "StudyDate": [21800506, 21800506, 21800626, 21250101], "StudyTime": [213014.531] * 4})
    with gzip.open(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:  # MIMIC ships the CSVs gzipped
        meta.to_csv(f, index=False)
    pd.DataFrame({"dicom_id": ["d1", "d2", "d3", "d4"], "study_id": meta["study_id"],
                  "subject_id": meta["subject_id"], "split": ["train", "train", "train", "test"]}).to_csv(
        tmp_path / "mimic-cxr-2.0.0-split.csv", index=False)
    labels = pd.DataFrame({"subject_id": [10000032, 10000032], "study_id": [50414267, 53189527],
                           **{label: [np.nan, np.nan] for label in CHEXPERT_LABELS}})
    labels.loc[0, "No Finding"], labels.loc[1, "Edema"], labels.loc[1, "Pneumonia"] = 1.0, 1.0, -1.0
    labels.to_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    report = tmp_path / "files" / "p10" / "p10000032" / "s50414267.txt"
    report.parent.mkdir(parents=True)
    report.write_text("                                 FINAL REPORT\n FINDINGS: No acute process.\n")
    assert detect_format(tmp_path) == "mimic"
    frame = read_manifest(tmp_path).set_index("study_id")
    assert list(frame.index) == ["50414267", "53189527", "56699142"]
    first = frame.loc["50414267"]
    assert first["image_paths"] == [str(tmp_path / "files/p10/p10000032/s50414267/d1.jpg"),
                                    str(tmp_path / "files/p10/p10000032/s50414267/d2.jpg")]
    assert first["view_positions"] == ["PA", "LATERAL"] and first["study_date"] == "2180-05-06"
    assert first["report"].startswith("FINAL REPORT") and "No acute process." in first["report"]
    assert first["No Finding"] == 1.0 and first["patient_id"] == "10000032" and first["split"] == "train"
    second = frame.loc["53189527"]
    assert second["Edema"] == 1.0 and second["Pneumonia"] == -1.0 and math.isnan(second["Cardiomegaly"])
    third = frame.loc["56699142"]
    assert third["view_positions"] == ["OTHER"] and third["report"] == "" and third["split"] == "test"
    assert math.isnan(third["No Finding"])


# -------------------------------------------------------------------------------------------------------- IU X-ray
def test_iu_xray_reports_and_projections(tmp_path):
    pd.DataFrame({
        "uid": [1, 2, 3], "MeSH": ["normal", "Cardiomegaly/mild", "normal"], "Problems": ["normal", "Cardiomegaly",
                                                                                         "normal"],
        "image": ["Xray Chest PA and Lateral"] * 3, "indication": ["Positive TB test", "dyspnea", np.nan],
        "comparison": [np.nan, "None.", np.nan],
        "findings": ["The cardiac silhouette and mediastinum size are within normal limits.",
                     "Heart size is mildly enlarged.", "Clear lungs."],
        "impression": ["Normal chest x-XXXX.", "Mild cardiomegaly.", "No acute disease."]}).to_csv(
        tmp_path / "indiana_reports.csv", index=False)
    pd.DataFrame({"uid": [1, 1, 2], "filename": ["1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png",
                                                 "2_IM-0652-1001.dcm.png"],
                  "projection": ["Frontal", "Lateral", "Frontal"]}).to_csv(tmp_path / "indiana_projections.csv",
                                                                           index=False)
    for name in ("1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png", "2_IM-0652-1001.dcm.png"):
        write_png(tmp_path / "images" / "images_normalized" / name)
    assert detect_format(tmp_path) == "iu" and detect_format(tmp_path / "indiana_projections.csv") == "iu"
    frame = read_manifest(tmp_path)
    assert list(frame["study_id"]) == ["1", "2"]  # uid 3 has no images
    first = frame.iloc[0]
    assert first["view_positions"] == ["PA", "LATERAL"]
    assert first["image_paths"][1] == str(tmp_path / "images" / "images_normalized" / "1_IM-0001-3001.dcm.png")
    assert first["report"].startswith("INDICATION: Positive TB test") and "IMPRESSION: Normal chest x-XXXX." in \
        first["report"] and "COMPARISON" not in first["report"]
    assert "COMPARISON: None." in frame.iloc[1]["report"] and frame.iloc[1]["view_positions"] == ["PA"]


# --------------------------------------------------------------------------------------------------- CheXpert-style
def test_chexpert_style_csv_groups_views_into_studies(tmp_path):
    root = tmp_path / "CheXpert-v1.0"
    paths = ["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
             "CheXpert-v1.0/train/patient00002/study2/view1_frontal.jpg",
             "CheXpert-v1.0/train/patient00002/study2/view2_lateral.jpg",
             "CheXpert-v1.0/train/patient00002/study1/view1_frontal.jpg"]
    for p in paths:
        write_png(tmp_path / p)
    table = pd.DataFrame({"Path": paths, "Sex": ["Female", "Male", "Male", "Male"], "Age": [68, 87, 87, 83],
                          "Frontal/Lateral": ["Frontal", "Frontal", "Lateral", "Frontal"],
                          "AP/PA": ["AP", "PA", np.nan, "AP"]})
    for label in CHEXPERT_LABELS:
        table[label] = np.nan
    table.loc[0, "No Finding"] = 1.0
    table.loc[1, "Edema"], table.loc[2, "Edema"] = -1.0, 1.0  # a positive view wins over an uncertain one
    table.loc[1, "Cardiomegaly"], table.loc[2, "Cardiomegaly"] = -1.0, 0.0  # uncertain wins over negative
    table.loc[3, "Pleural Effusion"] = 0.0
    table.to_csv(root / "train.csv", index=False)
    assert detect_format(root / "train.csv") == "chexpert"
    frame = read_manifest(root / "train.csv").set_index("study_id")
    assert list(frame.index) == ["patient00001_study1", "patient00002_study2", "patient00002_study1"]
    study = frame.loc["patient00002_study2"]
    assert study["view_positions"] == ["PA", "LATERAL"] and study["patient_id"] == "patient00002"
    assert study["image_paths"][1] == str(tmp_path / paths[2]) and Path(study["image_paths"][1]).exists()
    assert study["Edema"] == 1.0 and study["Cardiomegaly"] == -1.0 and math.isnan(study["Pneumonia"])
    assert frame.loc["patient00002_study1", "Pleural Effusion"] == 0.0
    assert set(frame["split"]) == {"train"} and frame.loc["patient00001_study1", "view_positions"] == ["AP"]


# ------------------------------------------------------------------------------------------ DICOM folder (PACS export)
def test_dicom_folder_grouped_by_tags_and_joined_with_reports(tmp_path):
    from test_data_io import ramp, write_dicom

    export = tmp_path / "export"
    studies = {("PAT1", "1.2.3.1", "ACC1", "20240105"): ["PA", "LL"], ("PAT1", "1.2.3.2", "ACC2", "20240301"): ["AP"],
               ("PAT2", "1.2.3.3", "ACC3", "20231231"): ["PA", "LATERAL"]}
    for (patient, uid, accession, date), views in studies.items():
        for k, view in enumerate(views):
            folder = export / patient / uid.replace(".", "_")
            folder.mkdir(parents=True, exist_ok=True)
            write_dicom(folder / f"IM{k:04d}", ramp(), bits_stored=12, PatientID=patient, StudyInstanceUID=uid,
                        AccessionNumber=accession, StudyDate=date, ViewPosition=view, InstanceNumber=k + 1)
    (export / "README.txt").write_text("exported by PACS")  # not DICOM: ignored
    sr = write_dicom(export / "report.dcm", ramp(), pixel_data=False, PatientID="PAT1", StudyInstanceUID="1.2.3.1")
    assert sr.exists()  # DICOM without pixel data (a report object): not an image of the study
    pd.DataFrame({"AccessionNumber": ["ACC1", "ACC3", "ACC9"],
                  "report": ["FINDINGS: Clear lungs.", "IMPRESSION: Right effusion.", "orphan"],
                  "Pleural Effusion": ["", "1.0", ""]}).to_csv(tmp_path / "reports.csv", index=False)
    assert detect_format(export) == "dicom-folder"
    frame = read_manifest(export, reports=tmp_path / "reports.csv").set_index("study_id")
    assert sorted(frame.index) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    first = frame.loc["1.2.3.1"]
    assert first["view_positions"] == ["PA", "LL"] and first["patient_id"] == "PAT1"
    assert [Path(p).name for p in first["image_paths"]] == ["IM0000", "IM0001"]
    assert first["study_date"] == "2024-01-05" and first["report"] == "FINDINGS: Clear lungs."
    assert frame.loc["1.2.3.3", "Pleural Effusion"] == 1.0 and frame.loc["1.2.3.2", "report"] == ""
    assert frame.loc["1.2.3.1", "split"] == frame.loc["1.2.3.2", "split"]  # same patient, same split
    pd.DataFrame({"study_instance_uid": ["1.2.3.2"], "text": ["IMPRESSION: Stable."]}).to_csv(
        tmp_path / "by_uid.csv", index=False)
    by_uid = read_manifest(export, format="dicom-folder", reports=tmp_path / "by_uid.csv").set_index("study_id")
    assert by_uid.loc["1.2.3.2", "report"] == "IMPRESSION: Stable." and by_uid.loc["1.2.3.1", "report"] == ""


def test_dicom_folder_given_as_relative_path_gives_readable_image_paths(tmp_path, monkeypatch):
    from test_data_io import ramp, write_dicom

    from rvl.data import read_image

    folder = tmp_path / "pacs" / "images"
    folder.mkdir(parents=True)
    write_dicom(folder / "IM0001", ramp(), bits_stored=12, PatientID="P9", StudyInstanceUID="9.9", ViewPosition="PA")
    monkeypatch.chdir(tmp_path)
    frame = read_manifest("pacs/images", format="dicom-folder")
    path = Path(frame.loc[0, "image_paths"][0])
    assert path.is_absolute() and path == folder / "IM0001"
    assert read_image(path).shape == ramp().shape


def test_image_paths_are_absolute_when_the_manifest_is_named_relatively(tmp_path, monkeypatch):
    """A manifest read through a relative path still yields absolute image paths, so a copy written elsewhere
    (e.g. the demo's labelled manifest) points at the same files."""
    frame = rvl_frame(tmp_path)
    write_manifest(frame, tmp_path / "m")
    (tmp_path / "m" / "images").symlink_to(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    read = read_manifest(Path("m") / "manifest.parquet")
    assert all(Path(p).is_absolute() and Path(p).exists() for paths in read["image_paths"] for p in paths)
    write_manifest(read, tmp_path / "copy")
    again = read_manifest(tmp_path / "copy" / "manifest.parquet")
    assert list(again["image_paths"]) == list(read["image_paths"])
