"""Checksummed artifacts: every reader refuses an altered file (naming it, the hashes and the rebuild command)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rvl.cli import main as rvl_main
from rvl.faults import corrupt, scribble
from rvl.integrity import (IntegrityError, check_files, check_sidecar, file_table, read_checksums, require_intact,
                           write_checksums)


def test_file_table_statuses_and_seal(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in (("a.bin", "alpha" * 100), ("b.bin", "beta" * 100), ("sub/c.bin", "gamma" * 100)):
        (tmp_path / name).write_text(text)
    table = write_checksums(tmp_path)
    assert set(table["files"]) == {"a.bin", "b.bin", "sub/c.bin"}
    assert read_checksums(tmp_path) == table
    assert [s.status for s in check_files(tmp_path, table)] == ["ok"] * 3

    corrupt(tmp_path / "a.bin", "flip")
    corrupt(tmp_path / "b.bin", "delete")
    (tmp_path / "stray.txt").write_text("x")
    statuses = {s.path: s.status for s in check_files(tmp_path, table)}
    assert statuses == {"a.bin": "corrupt", "b.bin": "missing", "sub/c.bin": "ok", "stray.txt": "extra"}
    with pytest.raises(IntegrityError, match=r"a\.bin: content does not match.*expected xxh3_128 [0-9a-f]{32}, found "
                                             r"[0-9a-f]{32}\); rebuild with: make it again"):
        require_intact(tmp_path, table, "make it again")

    edited = json.loads((tmp_path / "checksums.json").read_text())
    edited["files"]["a.bin"]["size"] += 1
    (tmp_path / "checksums.json").write_text(json.dumps(edited))
    with pytest.raises(IntegrityError, match="checksum table was altered"):
        read_checksums(tmp_path)


def test_truncated_file_is_named_with_its_size(tmp_path):
    (tmp_path / "w.bin").write_bytes(bytes(range(256)) * 40)
    table = file_table(tmp_path, ["w.bin"])
    corrupt(tmp_path / "w.bin", "truncate")
    with pytest.raises(IntegrityError, match=r"w\.bin: size \d+ bytes, expected 10240"):
        require_intact(tmp_path, table, "x")


# ------------------------------------------------------------------------------------------------------------ cache
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from rvl.data import prepare
    from test_prepare import make_manifest

    root = tmp_path_factory.mktemp("integrity")
    manifest = make_manifest(root)
    prepare(manifest, root / "cache", size=32, workers=0, progress=False)
    return manifest, root / "cache"


def data_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "dataset").glob("data-*.arrow"))


def test_cache_records_checksums_of_every_file(cache):
    _, cache_dir = cache
    info = json.loads((cache_dir / "prepare.json").read_text())
    assert set(info["checksums"]["files"]) == {"dataset/state.json", "dataset/dataset_info.json", "skipped.csv",
                                               *(f"dataset/{p.name}" for p in data_files(cache_dir))}
    assert sum(info["data_file_rows"]) == info["n_studies"]
    assert info["dropped_rows"] == [5]  # the all-broken study s6 of make_manifest


def test_scribbled_cache_refused_by_dataset_and_pretrain(cache, tmp_path, capsys):
    """The case of issue 16: 4 KB of random bytes in the middle of a cache file must stop training, not feed it."""
    from rvl.data import StudyDataset

    _, cache_dir = cache
    bad = tmp_path / "cache"
    shutil.copytree(cache_dir, bad)
    scribble(data_files(bad)[0], n=4096)
    with pytest.raises(IntegrityError, match=r"data-00000-of-00001\.arrow: content does not match .* --repair"):
        StudyDataset(bad)
    code = rvl_main(["pretrain", "--data", str(bad), "--output-dir", str(tmp_path / "run"), "--model", "rvl-tiny",
                     "--max-steps", "1", "--batch-size", "2", "--cpu", "--log-with", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "content does not match its checksum" in err and "Traceback" not in err
    assert "rvl prepare" in err and "--repair" in err
    assert not (tmp_path / "run" / "model").exists()


def test_prepare_rerun_on_a_damaged_cache_refuses_instead_of_up_to_date(cache, tmp_path, capsys):
    manifest, cache_dir = cache
    bad = tmp_path / "cache"
    shutil.copytree(cache_dir, bad)
    corrupt(bad / "dataset" / "state.json", "flip")
    code = rvl_main(["prepare", str(manifest), "--out", str(bad), "--size", "32", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "state.json" in err and "--repair" in err


def test_altered_finished_shard_is_rebuilt_on_resume(tmp_path):
    from rvl.data import prepare
    from rvl.data.cache_shards import shard_arrow_intact
    from test_prepare import make_manifest

    manifest = make_manifest(tmp_path)
    first = prepare(manifest, tmp_path / "a", size=32, workers=0, progress=False, keep_shards=True, shard_studies=2)
    shards = sorted((tmp_path / "a" / "shards").glob("*.arrow"))
    scribble(shards[0], n=64)
    assert not shard_arrow_intact(shards[0].parent, shards[0].stem)
    (tmp_path / "a" / "prepare.json").unlink()  # force the rebuild path
    again = prepare(manifest, tmp_path / "a", size=32, workers=0, progress=False, keep_shards=True, shard_studies=2)
    assert again["shards_built"] == 1 and again["shards_reused"] == 2
    assert again["checksums"]["files"] == first["checksums"]["files"]  # bit-identical result


# ------------------------------------------------------------------------------------------------------ model export
def test_exported_model_refused_when_a_file_changes(tmp_path):
    import torch

    from rvl.model import create_model, from_pretrained

    torch.manual_seed(0)
    out = create_model("rvl-tiny").save_pretrained(tmp_path / "model")
    table = read_checksums(out)
    assert {"open_clip_model.safetensors", "rvl/rvl_heads.safetensors", "open_clip_config.json"} <= set(table["files"])
    from_pretrained(out)
    corrupt(out / "rvl" / "rvl_heads.safetensors", "flip", seed=3)
    with pytest.raises(IntegrityError, match=r"rvl_heads\.safetensors: content does not match"):
        from_pretrained(out)


# ------------------------------------------------------------------------------------------------------------ index
def test_index_refused_when_a_file_or_the_header_changes(tmp_path):
    pytest.importorskip("faiss")
    from rvl.retrieval import EmbeddingIndex

    rng = np.random.default_rng(0)
    index = EmbeddingIndex.build(rng.standard_normal((50, 8)).astype(np.float32), np.arange(50), factory="Flat",
                                 metadata=pd.DataFrame({"study_id": [f"s{i}" for i in range(50)]}))
    out = index.save(tmp_path / "idx")
    assert set(json.loads((out / "index.json").read_text())["checksums"]["files"]) == {"index.faiss",
                                                                                       "metadata.parquet"}
    assert len(EmbeddingIndex.load(out)) == 50
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    corrupt(damaged / "metadata.parquet", "flip")
    with pytest.raises(IntegrityError, match=r"metadata\.parquet: content does not match.*rvl index build"):
        EmbeddingIndex.load(damaged)
    header = json.loads((out / "index.json").read_text())
    header["checksums"]["files"]["index.faiss"]["sha256"] = "0" * 64
    (out / "index.json").write_text(json.dumps(header))
    with pytest.raises(IntegrityError, match="checksum table was altered"):
        EmbeddingIndex.load(out)


# ------------------------------------------------------------------------------------------------------------ labels
def test_label_output_gets_a_sha256sum_sidecar(tmp_path, capsys):
    import hashlib

    source = tmp_path / "reports.csv"
    source.write_text("report\nNo effusion.\nSmall left effusion.\n")
    assert rvl_main(["label", str(source), "--no-progress"]) == 0
    out = tmp_path / "reports.labels.csv"
    line = (tmp_path / "reports.labels.csv.sha256").read_text()
    assert line == f"{hashlib.sha256(out.read_bytes()).hexdigest()}  reports.labels.csv\n"
    assert check_sidecar(out) == "ok"
    corrupt(out, "truncate")
    with pytest.raises(IntegrityError, match="reports.labels.csv: content does not match"):
        check_sidecar(out)
