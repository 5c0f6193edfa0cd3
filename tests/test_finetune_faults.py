"""``rvl finetune`` in the fault matrix on small data: every file it writes is checksummed and checked; a kill then
``--resume`` gives the same predictions; a damaged record, cache or checkpoint is refused naming it; two writers are
refused; a full disk leaves the previous output intact."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rvl.faults import corrupt, file_size_limit
from rvl.verify import verify_path

LABELS = ["No Finding", "Cardiomegaly", "Edema", "Support Devices"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RVL = [sys.executable, "-m", "rvl"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from rvl.data import prepare
    from rvl.phantoms import generate_phantoms

    manifest = generate_phantoms(tmp_path_factory.mktemp("ftf-phantoms"), 60, size=48, seed=4, progress=False)
    out = tmp_path_factory.mktemp("ftf-cache")
    prepare(manifest, out, size=48, workers=0, progress=False)
    return out


def _argv(cache: Path, out: Path, *extra: str) -> list[str]:
    return [*RVL, "finetune", "--data", str(cache), "--init", "scratch", "--model", "rvl-tiny", "--mode", "linear",
            "full", "--label-fraction", "1.0", "--seeds", "0", "--labels", *LABELS, "--output-dir", str(out),
            "--max-steps", "6", "--save-every", "2", "--batch-size", "8", "--linear-steps", "20", "--bootstrap", "20",
            "--cpu", *extra]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ftf-ref") / "FT"
    done = subprocess.run(_argv(cache, out), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _problems(path: Path) -> list[tuple[str, str]]:
    return [(s.path, s.status) for _, statuses in verify_path(path) for s in statuses if s.status != "ok"]


def _predictions(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "predictions").glob("*.csv"))}


def test_every_file_is_checksummed_and_verify_is_clean(reference):
    from rvl.integrity import read_checksums

    table = read_checksums(reference)
    assert {"summary.csv", "summary.md", "config.json"} <= set(table["files"])
    assert any(rel.startswith("embeddings/") for rel in table["files"])
    assert any(rel.startswith("predictions/") for rel in table["files"])
    assert not any("/checkpoints/" in rel for rel in table["files"])  # checkpoints carry their own tables
    checked = [root for root, _ in verify_path(reference)]
    assert reference in checked and any("checkpoints" in str(root) for root in checked)
    assert _problems(reference) == []


@pytest.mark.parametrize("target", ["result", "embeddings", "checksums", "subsets"])
def test_damaged_files_are_refused_naming_them(reference, cache, tmp_path, target):
    out = tmp_path / "FT"
    shutil.copytree(reference, out)
    if target == "result":
        damaged = next(out.glob("runs/*__linear__*/result.json"))
    elif target == "embeddings":
        damaged = next(out.glob("embeddings/*.npz"))
        shutil.rmtree(next(out.glob("runs/*__linear__*")))  # the linear run must read the cache again
    elif target == "subsets":
        damaged = next(out.glob("subsets/*.txt"))
    else:
        damaged = out / "checksums.json"
    corrupt(damaged, "flip", seed=3)
    assert any(Path(p).name == damaged.name for p, _ in _problems(out))
    done = subprocess.run(_argv(cache, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert damaged.name in done.stderr and ("rebuild with" in done.stderr or "delete it" in done.stderr)


@pytest.mark.parametrize("deleted", ["embeddings/*.npz", "checksums.json"])
def test_a_deleted_cache_or_table_is_no_loss(reference, cache, tmp_path, deleted):
    """The embeddings cache is computed again when needed (and leaves the table); the table is rebuilt from the
    sealed run records. Either way the results are unchanged and ``rvl verify`` is clean again."""
    out = tmp_path / "FT"
    shutil.copytree(reference, out)
    gone = next(out.glob(deleted))
    gone.unlink()
    assert (gone.relative_to(out).as_posix() if deleted != "checksums.json" else "checksums.json", "missing") in \
        _problems(out)
    done = subprocess.run(_argv(cache, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _problems(out) == [] and _predictions(out) == _predictions(reference)


def test_a_damaged_checkpoint_is_refused_before_resuming(reference, cache, tmp_path):
    out = tmp_path / "FT"
    shutil.copytree(reference, out)
    run = next(out.glob("runs/*__full__*"))
    (run / "result.json").unlink()  # unfinished: --resume loads its last checkpoint
    weights = next(run.glob("checkpoints/step_*/model.safetensors"))
    corrupt(weights, "flip", seed=1)
    done = subprocess.run(_argv(cache, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model.safetensors" in done.stderr and "rebuild with" in done.stderr


@pytest.mark.slow
def test_killed_inside_a_checkpoint_write_then_resume_gives_the_same_predictions(reference, cache, tmp_path):
    out = tmp_path / "FT"
    proc = subprocess.Popen(_argv(cache, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = "", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        found = list(out.glob("runs/*/checkpoints/.tmp-*"))
        if found:
            seen = found[0].name
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert seen, "the run finished before a checkpoint write could be caught"
    done = subprocess.run(_argv(cache, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _predictions(out) == _predictions(reference)
    assert (out / "summary.csv").read_bytes() == (reference / "summary.csv").read_bytes()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name] and _problems(out) == []


def test_a_second_writer_is_refused(reference, cache, tmp_path):
    from rvl.fileio import exclusive_output

    out = tmp_path / "FT"
    with exclusive_output(out / ".finetune.lock", "test"):
        done = subprocess.run(_argv(cache, out), env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "being written by another process" in done.stderr, done.stderr[-2000:]
    assert not (out / "runs").exists()


def test_disk_full_is_reported_and_the_previous_output_stays(reference, cache, tmp_path):
    out = tmp_path / "FT"
    shutil.copytree(reference, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    largest = max(len(b) for b in before.values())
    again = _argv(cache, out, "--resume")
    again[again.index("1.0")] = "0.5"  # a new run: new embeddings are not needed, new predictions and checkpoints are
    done = subprocess.run(again, env=ENV, capture_output=True, text=True, preexec_fn=file_size_limit(largest // 4))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "out of disk space" in done.stderr and "Traceback" not in done.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    kept = [rel for rel in before if rel.parts[0] in ("runs", "predictions", "embeddings", "subsets")]
    assert kept and all(after.get(rel) == before[rel] for rel in kept)
    assert not [s for s in _problems(out) if s[1] in ("corrupt", "missing")]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
