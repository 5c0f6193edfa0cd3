"""Fault-matrix cells on small data: SIGKILL of ``rvl prepare`` / ``rvl label`` then a rerun gives bit-identical
artifacts; a full disk gives exit 2 with a clear message and leaves the previous artifact intact. (Kill + resume of
``rvl pretrain`` and of index saves: tests/test_train.py and tests/test_retrieval.py; corruption: test_integrity.py,
test_verify.py; two writers: test_two_writers.py; bad inputs: test_fuzz.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from rvl.faults import file_size_limit
from rvl.verify import verify_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RVL = [sys.executable, "-m", "rvl"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from rvl.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, 24, size=48, seed=0, progress=False)
    return out / "manifest.parquet"


def kill_when(argv: list[str], out: Path, ready) -> str:
    """Start ``argv``, SIGKILL it as soon as ``ready(out)`` is true; returns what was seen at the kill."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    seen = ""
    while proc.poll() is None and time.time() < deadline:
        seen = ready(out)
        if seen:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    return seen


def temp_files(out: Path) -> str:
    found = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    return found[0] if found else ""


def table(cache: Path) -> dict:
    return json.loads((cache / "prepare.json").read_text())["checksums"]["files"]


def test_prepare_killed_inside_a_shard_write_then_rerun_is_bit_identical(phantoms, tmp_path):
    argv = [*RVL, "prepare", str(phantoms), "--size", "32", "--shard-studies", "4", "--workers", "1",
            "--no-progress"]
    subprocess.run([*argv, "--out", str(tmp_path / "ref")], env=ENV, check=True, capture_output=True)
    seen = kill_when([*argv, "--out", str(tmp_path / "killed")], tmp_path / "killed", temp_files)
    assert seen, "the run finished before a write could be caught"
    assert not (tmp_path / "killed" / "prepare.json").exists()
    subprocess.run([*argv, "--out", str(tmp_path / "killed")], env=ENV, check=True, capture_output=True)
    assert table(tmp_path / "killed") == table(tmp_path / "ref")
    assert not temp_files(tmp_path / "killed")
    assert all(s.status == "ok" for _, statuses in verify_path(tmp_path / "killed") for s in statuses)


def test_label_killed_mid_output_then_rerun_is_bit_identical(phantoms, tmp_path):
    reports = tmp_path / "reports.csv"
    pd.DataFrame({"report": list(pd.read_parquet(phantoms)["report"]) * 20}).to_csv(reports, index=False)
    argv = [*RVL, "label", str(reports), "--chunk-size", "40", "--no-progress"]
    subprocess.run([*argv, "--output", str(tmp_path / "ref.csv")], env=ENV, check=True, capture_output=True)
    out = tmp_path / "killed"
    out.mkdir()
    seen = kill_when([*argv, "--output", str(out / "ref.csv")], out, temp_files)
    assert seen and not (out / "ref.csv").exists()
    subprocess.run([*argv, "--output", str(out / "ref.csv")], env=ENV, check=True, capture_output=True)
    assert (out / "ref.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    assert (out / "ref.csv.sha256").read_text() == (tmp_path / "ref.csv.sha256").read_text()
    assert not temp_files(out)


@pytest.mark.parametrize("command", ["prepare", "label"])
def test_disk_full_is_reported_and_the_previous_artifact_stays(phantoms, tmp_path, command):
    """A write that fails (RLIMIT_FSIZE: the file cannot grow, as on a full disk) at the write call itself."""
    if command == "prepare":
        argv = [*RVL, "prepare", str(phantoms), "--size", "32", "--workers", "0", "--no-progress", "--out",
                str(tmp_path / "out")]
        again = [a if a != "32" else "64" for a in argv]  # a new version with bigger images
        snapshot = lambda: table(tmp_path / "out")  # noqa: E731
    else:
        reports = tmp_path / "reports.csv"
        pd.DataFrame({"report": list(pd.read_parquet(phantoms)["report"]) * 20}).to_csv(reports, index=False)
        argv = again = [*RVL, "label", str(reports), "--no-progress", "--output", str(tmp_path / "out" / "l.csv")]
        (tmp_path / "out").mkdir()
        snapshot = lambda: (tmp_path / "out" / "l.csv").read_bytes()  # noqa: E731
    subprocess.run(argv, env=ENV, check=True, capture_output=True)
    before = snapshot()
    largest = max(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    done = subprocess.run(again, env=ENV, capture_output=True, text=True, preexec_fn=file_size_limit(largest // 2))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "out of disk space" in done.stderr and "Traceback" not in done.stderr
    assert snapshot() == before
    assert all(s.status == "ok" for _, statuses in verify_path(tmp_path / "out") for s in statuses)
