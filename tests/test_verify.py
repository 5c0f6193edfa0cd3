"""``rvl verify`` on damaged copies of each artifact kind; ``rvl prepare --repair`` rebuilds only what is damaged."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rvl.cli import main as rvl_main
from rvl.faults import corrupt
from rvl.integrity import write_checksums, write_sidecar


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache split over several data files (tiny max_shard_size), so a repair can leave most of them alone."""
    from test_prepare import make_manifest

    root = tmp_path_factory.mktemp("verify")
    manifest = make_manifest(root)
    assert rvl_main(["prepare", str(manifest), "--out", str(root / "cache"), "--size", "32", "--workers", "0",
                     "--no-progress", "--max-shard-size", "3KB", "--shard-studies", "2"]) == 0
    return manifest, root / "cache"


def verify(path: Path, capsys) -> tuple[int, list[str]]:
    code = rvl_main(["verify", str(path)])
    return code, capsys.readouterr().out.splitlines()


def test_intact_cache_verifies_and_each_damage_is_named(cache, tmp_path, capsys):
    _, cache_dir = cache
    code, lines = verify(cache_dir, capsys)
    files = sorted((cache_dir / "dataset").glob("data-*.arrow"))
    assert code == 0 and len(files) >= 3
    assert all(line.startswith("ok ") for line in lines) and len(lines) == len(files) + 4  # + header, state, info, csv

    bad = tmp_path / "cache"
    shutil.copytree(cache_dir, bad)
    corrupt(bad / "dataset" / files[1].name, "flip")
    corrupt(bad / "dataset" / files[2].name, "delete")
    (bad / "dataset" / "notes.txt").write_text("stray")
    code, lines = verify(bad, capsys)
    assert code == 1
    assert f"corrupt  {bad / 'dataset' / files[1].name}  (expected sha256 " in "\n".join(lines)
    assert f"missing  {bad / 'dataset' / files[2].name}" in lines
    assert f"extra    {bad / 'dataset' / 'notes.txt'}" in lines

    corrupt(bad / "prepare.json", "flip", seed=5)
    code, lines = verify(bad, capsys)
    assert code == 1 and lines[0].startswith(f"corrupt  {bad / 'prepare.json'}")


def test_repair_rebuilds_only_the_damaged_files_bit_identically(cache, tmp_path, capsys, monkeypatch):
    import rvl.data.cache_repair as repair_module
    from rvl.data import StudyDataset

    manifest, cache_dir = cache
    bad = tmp_path / "cache"
    shutil.copytree(cache_dir, bad)
    files = sorted((bad / "dataset").glob("data-*.arrow"))
    corrupt(files[0], "scribble")
    corrupt(files[-1], "delete")
    read = []
    real = repair_module.prepare_study
    monkeypatch.setattr(repair_module, "prepare_study", lambda task: read.append(task[0]) or real(task))
    code = rvl_main(["prepare", str(manifest), "--out", str(bad), "--size", "32", "--repair", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "rebuilt dataset/data-00000" in out and "every file matches the checksum recorded" in out
    # first file = study s1 (prepare shard 0: manifest rows 0-1), last = s5 (shard 2: rows 4-5); shard 1 is not read
    assert sorted(read) == [0, 1, 4, 5]
    for name in ["prepare.json", *(f"dataset/{p.name}" for p in files), "dataset/state.json"]:
        if name != "prepare.json":
            assert (bad / name).read_bytes() == (cache_dir / name).read_bytes(), name
    assert verify(bad, capsys)[0] == 0
    a, b = StudyDataset(cache_dir, train=False), StudyDataset(bad, train=False)
    for i in range(len(a)):
        assert np.array_equal(a[i]["images"].numpy(), b[i]["images"].numpy())

    assert rvl_main(["prepare", str(manifest), "--out", str(bad), "--size", "32", "--repair"]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_repair_refuses_when_the_sources_changed(cache, tmp_path, capsys):
    import pandas as pd

    manifest, cache_dir = cache
    bad = tmp_path / "cache"
    shutil.copytree(cache_dir, bad)
    corrupt(sorted((bad / "dataset").glob("data-*.arrow"))[0], "flip")
    frame = pd.read_parquet(manifest)
    frame.loc[0, "report"] = "FINDINGS: changed."
    changed = tmp_path / "changed.parquet"
    frame.to_parquet(changed)
    code = rvl_main(["prepare", str(changed), "--out", str(bad), "--size", "32", "--repair", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "changed since" in err and "Traceback" not in err


def test_run_dir_model_checkpoint_and_label_output(tmp_path, capsys):
    run = tmp_path / "run"
    for part in ("checkpoints/step_00000003", "model/rvl"):
        (run / part).mkdir(parents=True)
    (run / "checkpoints/step_00000003/model.safetensors").write_bytes(bytes(range(256)) * 8)
    (run / "checkpoints/step_00000003/random_states_0.pkl").write_bytes(b"state")
    (run / "model/open_clip_config.json").write_text("{}")
    (run / "model/rvl/rvl_heads.safetensors").write_bytes(b"heads" * 50)
    (run / "config.yaml").write_text("seed: 0\n")
    write_checksums(run / "checkpoints/step_00000003")
    write_checksums(run / "model")
    code, lines = verify(run, capsys)
    assert code == 0 and len(lines) == 6  # two checksums.json + four files; config.yaml is no artifact file
    corrupt(run / "model/rvl/rvl_heads.safetensors", "truncate")
    code, lines = verify(run, capsys)
    assert code == 1 and any(line.startswith("corrupt") and "rvl_heads.safetensors" in line for line in lines)
    (run / "checkpoints/step_00000003/checksums.json").unlink()
    code, lines = verify(run / "checkpoints", capsys)
    assert code == 1 and lines == [f"missing  {run / 'checkpoints/step_00000003/checksums.json'}"]

    labels = tmp_path / "labels.csv"
    labels.write_text("report,Edema\nx,1.0\n")
    write_sidecar(labels)
    assert verify(labels, capsys)[0] == 0
    labels.write_text("report,Edema\nx,0.0\n")
    code, lines = verify(labels, capsys)
    assert code == 1 and lines[0].startswith(f"corrupt  {labels}")
    assert rvl_main(["verify", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    assert rvl_main(["verify", str(tmp_path / "empty")]) == 2
    assert "no rvl artifact" in capsys.readouterr().err
