"""rvl prepare (the on-disk cache of studies) and StudyDataset over a cache and over a manifest."""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from rvl.cli import main as rvl_main
from rvl.constants import CHEXPERT_LABELS, VIEW_TYPES
from rvl.data import PrepareError, StudyDataset, collate_studies, prepare, read_image, read_manifest
from rvl.data.io import box_to_square, to_square_uint8
from rvl.data.manifest import write_manifest

SIZE = 48
BOX = [0.25, 0.5, 0.75, 0.8]
LEVELS: dict[str, int] = {}  # image file name -> its grey level, filled by make_manifest


def make_manifest(root: Path) -> Path:
    """6 studies: PNG 8/16-bit (non-square), a MONOCHROME1 DICOM, a 3-view study, a broken image, an all-broken study.

    Every image is a flat grey of its own level so a test can tell which view ended up in which slot.
    """
    from test_data_io import write_dicom

    images = root / "images"
    images.mkdir(parents=True)
    levels = iter(range(20, 250, 12))

    def png(name: str, shape=(60, 40), bits: int = 8) -> str:
        level = LEVELS[name] = next(levels)
        if bits == 16:
            Image.fromarray(np.full(shape, level * 257, np.uint16)).save(images / name)
        else:
            Image.fromarray(np.full(shape, level, np.uint8)).save(images / name)
        return f"images/{name}"

    def dcm(name: str) -> str:
        level = LEVELS[name] = next(levels)  # MONOCHROME1 with a window: the reader inverts, so store the complement
        window_value = 4095 - round(level / 255 * 4095)
        write_dicom(images / name, np.full((50, 50), window_value, np.uint16), "MONOCHROME1", bits_stored=12,
                    window=(2048, 4096))
        return f"images/{name}"

    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    studies = [
        ("p1", "s1", [png("s1_pa.png"), png("s1_lat.png", (40, 60))], ["PA", "LATERAL"]),
        ("p1", "s2", [png("s2_lat.png", bits=16), png("s2_ap.png", bits=16)], ["LATERAL", "AP"]),
        ("p2", "s3", [dcm("s3_pa.dcm"), png("s3_ll.png")], ["PA", "LL"]),
        ("p3", "s4", [png("s4_pa.png"), png("s4_lat.png"), png("s4_ll.png")], ["PA", "LATERAL", "LL"]),
        ("p4", "s5", [png("s5_pa.png"), "images/broken.png"], ["PA", "LATERAL"]),
        ("p5", "s6", ["images/broken.png", "images/missing.png"], ["PA", "LATERAL"]),
    ]
    rows = []
    for k, (patient, study, paths, views) in enumerate(studies):
        labels = {label: np.nan for label in CHEXPERT_LABELS}
        labels[CHEXPERT_LABELS[k]] = 1.0
        boxes = [[{"label": "Pleural Effusion", "finding": "pleural effusion", "side": "left", "box": BOX}]] + \
            [[] for _ in paths[1:]]
        rows.append({"patient_id": patient, "study_id": study, "study_date": f"2021-0{k + 1}-01",
                     "split": "test" if patient == "p3" else "train", "image_paths": paths, "view_positions": views,
                     "report": f"FINDINGS: study {study}.", **labels, "finding_boxes": json.dumps(boxes),
                     "findings": "[]"})
    write_manifest(pd.DataFrame(rows), root)
    return root / "manifest.parquet"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    manifest = make_manifest(root)
    info = prepare(manifest, root / "cache", size=SIZE, workers=2, progress=False)
    return manifest, root / "cache", info


def test_cache_holds_resized_padded_pixels_boxes_and_skips(prepared):
    import datasets

    manifest, cache, info = prepared
    source = read_manifest(manifest).set_index("study_id")
    data = datasets.load_from_disk(str(cache / "dataset"))
    assert info["n_studies"] == len(data) == 5 and info["n_images"] == 10 and info["n_skipped_images"] == 3
    assert info["n_dropped_studies"] == 1 and json.loads((cache / "prepare.json").read_text())["size"] == SIZE
    skipped = pd.read_csv(cache / "skipped.csv")
    assert sorted(skipped["study_id"]) == ["s5", "s6", "s6"]
    assert set(skipped["path"].map(lambda p: Path(p).name)) == {"broken.png", "missing.png"}
    assert skipped.set_index("path").loc[str(manifest.parent / "images" / "missing.png"), "reason"] == "file not found"
    for row in data:
        expected = source.loc[row["study_id"]]
        kept = [p for p in expected["image_paths"] if "broken" not in p]
        assert row["image_paths"] == kept and len(row["pixels"]) == len(kept)
        assert row["view_positions"] == expected["view_positions"][:len(kept)]
        assert row["report"] == expected["report"] and row["split"] == expected["split"]
        for label in CHEXPERT_LABELS:
            value = row[label]
            assert (value is None or math.isnan(value)) if math.isnan(expected[label]) else value == expected[label]
        for path, pixels in zip(kept, row["pixels"]):
            image = read_image(path)
            np.testing.assert_array_equal(np.frombuffer(pixels, np.uint8).reshape(SIZE, SIZE),
                                          to_square_uint8(image, SIZE))
        boxes = json.loads(row["finding_boxes"])
        height, width = read_image(kept[0]).shape
        np.testing.assert_allclose(boxes[0][0]["box"], box_to_square(BOX, height, width, SIZE))
        assert boxes[0][0]["side"] == "left" and len(boxes) == len(kept)
    s1 = [r for r in data if r["study_id"] == "s1"][0]
    assert json.loads(s1["finding_boxes"])[0][0]["box"][0] > BOX[0]  # 60x40 image: padding shifts x inwards


def test_rerun_skips_finished_work_and_resumes_from_shards(tmp_path, monkeypatch):
    import rvl.data.cache as prepare_module

    manifest = make_manifest(tmp_path)
    calls = []
    worker = prepare_module._prepare_study
    monkeypatch.setattr(prepare_module, "_prepare_study", lambda task: calls.append(task[0]) or worker(task))
    first = prepare(manifest, tmp_path / "cache", size=SIZE, workers=0, shard_studies=2, keep_shards=True,
                    progress=False)
    assert first["shards_built"] == 3 and sorted(calls) == list(range(6))
    dataset_mtime = os.stat(tmp_path / "cache" / "dataset").st_mtime_ns
    calls.clear()
    again = prepare(manifest, tmp_path / "cache", size=SIZE, workers=0, shard_studies=2, progress=False)
    assert again["up_to_date"] and calls == [] and os.stat(tmp_path / "cache" / "dataset").st_mtime_ns == \
        dataset_mtime
    # an image changes: only its shard is read again; the others come from DIR/shards
    Image.fromarray(np.full((60, 40), 7, np.uint8)).save(tmp_path / "images" / "s4_lat.png")
    changed = prepare(manifest, tmp_path / "cache", size=SIZE, workers=0, shard_studies=2, keep_shards=True,
                      progress=False)
    assert changed["shards_built"] == 1 and changed["shards_reused"] == 2 and sorted(calls) == [2, 3]
    # interrupted before the final write: the finished shards are reused, nothing is decoded again
    (tmp_path / "cache" / "prepare.json").unlink()
    shutil.rmtree(tmp_path / "cache" / "dataset")
    calls.clear()
    resumed = prepare(manifest, tmp_path / "cache", size=SIZE, workers=0, shard_studies=2, progress=False)
    assert resumed["shards_reused"] == 3 and calls == [] and resumed["n_studies"] == 5
    assert not (tmp_path / "cache" / "shards").exists()  # removed once the dataset is written


def test_strict_makes_the_first_failure_fatal(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    with pytest.raises(PrepareError, match="broken.png: not an image"):
        prepare(manifest, tmp_path / "cache", size=SIZE, workers=0, strict=True, progress=False)
    assert not (tmp_path / "cache" / "dataset").exists()
    code = rvl_main(["prepare", str(manifest), "--out", str(tmp_path / "cli"), "--size", str(SIZE), "--workers", "2",
                     "--strict", "--no-progress"])
    assert code == 2 and "broken.png" in capsys.readouterr().err
    assert rvl_main(["prepare", str(manifest), "--out", str(tmp_path / "cli"), "--size", str(SIZE), "--workers", "2",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared 5 studies (10 images" in out and "skipped 3 image(s)" in out


def test_prepare_cli_reads_a_dicom_folder_with_reports(tmp_path, capsys):
    from test_data_io import ramp, write_dicom

    (tmp_path / "export").mkdir()
    for k, view in enumerate(["PA", "LATERAL"]):
        write_dicom(tmp_path / "export" / f"IM{k}", ramp(), bits_stored=12, PatientID="P9", StudyInstanceUID="1.2.9",
                    AccessionNumber="A9", StudyDate="20240202", ViewPosition=view)
    pd.DataFrame({"accession_number": ["A9"], "report": ["IMPRESSION: Normal."]}).to_csv(tmp_path / "r.csv",
                                                                                         index=False)
    assert rvl_main(["prepare", str(tmp_path / "export"), "--format", "dicom-folder", "--reports",
                     str(tmp_path / "r.csv"), "--out", str(tmp_path / "cache"), "--size", "32", "--workers", "1",
                     "--no-progress"]) == 0
    item = StudyDataset(tmp_path / "cache", train=False)[0]
    assert item["report"] == "IMPRESSION: Normal." and item["view_types"].tolist() == [0, 2]
    assert rvl_main(["prepare", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "c2")]) == 2


# ------------------------------------------------------------------------------------------------------ StudyDataset
def level_of(images: torch.Tensor) -> list[int]:
    """Grey level (0-255) at the centre of each view slot, undoing the default normalisation."""
    centre = images[:, 0, SIZE // 2, SIZE // 2] * 0.25 + 0.5
    return [round(float(v) * 255) for v in centre]


def test_cache_and_manifest_sources_give_the_same_items(prepared):
    manifest, cache, _ = prepared
    from_cache = StudyDataset(cache, max_views=3, train=False)
    from_manifest = StudyDataset(manifest, max_views=3, train=False, size=SIZE)
    assert len(from_cache) == 5 and len(from_manifest) == 6  # the manifest still lists the all-broken study
    for i in range(4):
        a, b = from_cache[i], from_manifest[i]
        assert a["study_id"] == b["study_id"] and a["report"] == b["report"]
        torch.testing.assert_close(a["images"], b["images"])
        assert torch.equal(a["view_mask"], b["view_mask"]) and torch.equal(a["view_types"], b["view_types"])
        torch.testing.assert_close(a["labels"], b["labels"], equal_nan=True)
    item = from_cache[0]
    assert item["images"].shape == (3, 3, SIZE, SIZE) and item["images"].dtype == torch.float32
    assert item["view_mask"].tolist() == [True, True, False] and item["images"][2].abs().sum() == 0
    assert item["view_types"][:2].tolist() == [VIEW_TYPES.index("PA"), VIEW_TYPES.index("LATERAL")]
    assert item["labels"].shape == (14,) and item["labels"][0] == 1 and torch.isnan(item["labels"][1])
    assert from_cache.frame["study_id"].tolist() == ["s1", "s2", "s3", "s4", "s5"] and "pixels" not in \
        from_cache.frame


def test_eval_puts_frontal_first_and_train_samples_without_replacement(prepared):
    _, cache, _ = prepared
    evaluation = StudyDataset(cache, max_views=2, train=False)
    s2 = evaluation[1]  # stored as [LATERAL, AP]
    assert s2["view_types"].tolist() == [VIEW_TYPES.index("AP"), VIEW_TYPES.index("LATERAL")]
    s3 = evaluation[2]  # the MONOCHROME1 DICOM frontal comes out at its display level, not inverted
    assert abs(level_of(s3["images"])[0] - LEVELS["s3_pa.dcm"]) <= 2
    assert level_of(s3["images"])[1] == LEVELS["s3_ll.png"]
    train = StudyDataset(cache, max_views=2, train=True, seed=3)
    seen = set()
    for epoch in range(12):
        train.set_epoch(epoch)
        item = train[3]  # three views, two slots
        levels = level_of(item["images"])
        assert item["view_mask"].all() and levels[0] != levels[1]  # never the same view twice
        seen.add(tuple(sorted(levels)))
        again = train[3]
        assert torch.equal(again["images"], item["images"])  # deterministic given (seed, epoch, index)
    assert len(seen) == 3  # every pair of the three views gets drawn over the epochs
    wide = StudyDataset(cache, max_views=4, train=True)[3]
    assert wide["view_mask"].tolist() == [True, True, True, False]
    assert len(set(level_of(wide["images"])[:3])) == 3


def test_transform_split_collate_and_pickling(prepared):
    _, cache, _ = prepared
    modes = []

    def transform(image: Image.Image) -> torch.Tensor:
        modes.append((image.mode, image.size))
        return torch.from_numpy(np.asarray(image, np.float32) / 255).expand(3, -1, -1)

    test_split = StudyDataset(cache, split="test", image_transform=transform, train=False)
    assert len(test_split) == 1 and test_split[0]["study_id"] == "s4" and modes[0] == ("L", (SIZE, SIZE))
    with pytest.raises(ValueError, match="splits present"):
        StudyDataset(cache, split="validate")
    dataset = StudyDataset(cache, split="train", train=False)
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone[0]["images"], dataset[0]["images"])
    assert len(pickle.dumps(dataset)) < 200_000  # the memory-mapped pixels are re-opened, not pickled
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_studies)
    batch = next(iter(loader))
    assert batch["images"].shape == (3, 2, 3, SIZE, SIZE) and batch["view_mask"].shape == (3, 2)
    assert batch["labels"].shape == (3, 14) and batch["index"].tolist() == [0, 1, 2]
    assert batch["study_id"] == ["s1", "s2", "s3"] and isinstance(batch["report"][0], str)


def test_manifest_source_counts_unreadable_images(prepared, caplog):
    manifest, _, _ = prepared
    dataset = StudyDataset(manifest, max_views=2, train=False, size=SIZE)
    s5 = dataset[4]  # one good view, one broken
    assert s5["view_mask"].tolist() == [True, False] and dataset.skipped == 1
    s6 = dataset[5]  # no readable view: replaced by the next study (wraps to the first)
    assert s6["study_id"] == "s1" and dataset.skipped == 3
    with pytest.raises(ValueError, match="broken.png"):
        StudyDataset(manifest, train=False, size=SIZE, strict=True)[4]
