"""``rvl demo`` in the fault matrix on a small run (60 studies, 4 steps): killed while training, it resumes and ends
with the uninterrupted run's models and metrics; a damaged stage record makes that stage run again; its own files
are checked by ``rvl verify``; a second demo on the folder is refused; training of other settings is never resumed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rvl.faults import corrupt
from rvl.verify import verify_path

pytestmark = pytest.mark.timeout(900)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ARGS = [sys.executable, "-m", "rvl", "demo", "--studies", "60", "--max-steps", "4", "--device", "cpu"]


def _demo(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*ARGS, "--output", str(out)], env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-ref") / "demo"
    done = _demo(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _weights(out: Path, key: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"train_{key}" / "model" / "open_clip_model.safetensors"))


def _metrics(out: Path) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if not any(t in k for t in ("seconds", "runtime", "per_s", "reused"))}
        return value
    return strip(json.loads((out / "metrics.json").read_text()))


def _same_as_reference(out: Path, reference: Path) -> None:
    for key in ("multiview", "frontal"):
        a, b = _weights(reference, key), _weights(out, key)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    assert _metrics(out) == _metrics(reference)


def test_verify_checks_the_demo_and_its_own_files(reference):
    checked = {root.relative_to(reference).as_posix() if root != reference else "." for root, _ in
               verify_path(reference)}
    assert {"cache", "cache_frontal", "index_study", "index_report", "metrics.json", "report.html",
            "labelled/manifest.parquet", "stages/pretrain.stage.json"} <= checked
    assert [s for _, statuses in verify_path(reference) for s in statuses if s.status != "ok"] == []
    assert not list(reference.glob(".train_*")), "the trainings were swapped in"


@pytest.mark.slow
def test_killed_while_training_then_rerun_resumes_and_ends_identical(reference, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen([*ARGS, "--output", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen, deadline = [], time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        seen = list(out.glob(".train_multiview.next/checkpoints/step_00000002"))
        if seen:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert seen, "the demo finished before a checkpoint could be caught"
    time.sleep(1.0)
    children = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert children == [], "the trainings died with the demo"
    done = _demo(out)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "train_multiview" / "train.log").read_text()
    assert "--resume" in done.stdout + done.stderr and "resumed from" in log
    _same_as_reference(out, reference)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_a_damaged_stage_record_runs_that_stage_again(reference, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(reference, out)
    corrupt(out / "stages" / "index.stage.json", "flip", seed=2)
    assert any(s.path == "index.stage.json" and s.status == "corrupt" for _, statuses in verify_path(out / "stages")
               for s in statuses)
    done = _demo(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stages/index.stage.json is damaged" in done.stderr and "[5/7] index done" in done.stdout
    assert "[4/7] pretrain: reusing" in done.stdout
    assert [s for _, statuses in verify_path(out) for s in statuses if s.status != "ok"] == []


def test_a_second_demo_on_the_folder_is_refused(tmp_path):
    from rvl.fileio import exclusive_output

    with exclusive_output(tmp_path / "demo" / ".demo.lock", "test"):
        done = _demo(tmp_path / "demo")
    assert done.returncode == 2 and "being written by another process" in done.stderr
    assert "Traceback" not in done.stderr


def test_training_of_other_settings_is_never_resumed(tmp_path):
    from rvl.demo.stages import _training_folder

    folder = tmp_path / ".train_multiview.next"
    assert _training_folder(folder, "key-a") == []
    (folder / "checkpoints").mkdir()
    assert _training_folder(folder, "key-a") == ["--resume"]
    assert _training_folder(folder, "key-b") == [] and not (folder / "checkpoints").exists()


def test_temporaries_of_a_killed_demo_are_removed_by_the_next_one(tmp_path):
    from rvl.demo.cli import _remove_temporaries

    (tmp_path / "labelled_frontal").mkdir(parents=True)
    (tmp_path / "labelled_frontal" / ".manifest.csv.tmp-123").write_text("half")
    (tmp_path / ".train_multiview.next" / "checkpoints" / ".tmp-step_00000002").mkdir(parents=True)
    (tmp_path / "labelled_frontal" / "manifest.csv").write_text("kept")
    _remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []
    assert (tmp_path / "labelled_frontal" / "manifest.csv").read_text() == "kept"
    assert (tmp_path / ".train_multiview.next" / "checkpoints").is_dir()  # a resumable training is kept
