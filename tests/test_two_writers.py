"""Two writers on one output: the second ``rvl prepare`` / ``rvl index build`` / ``rvl pretrain`` is refused at once
(exit 2, the lock named) while the first holds it, and nothing of the first's output changes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rvl.cli import main as rvl_main
from rvl.fileio import OutputBusyError, exclusive_output


def hold_lock(lock: Path):
    """A separate process holding ``lock`` until its stdin closes (an OS lock, like a second rvl command's)."""
    code = textwrap.dedent(f"""
        import sys
        from filelock import FileLock
        lock = FileLock({str(lock)!r})
        lock.acquire()
        print("held", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_exclusive_output_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    proc = hold_lock(tmp_path / ".x.lock")
    with pytest.raises(OutputBusyError, match=r"the thing is being written by another process \(lock .*\.x\.lock"):
        with exclusive_output(tmp_path / ".x.lock", "the thing"):
            pass
    release(proc)
    with exclusive_output(tmp_path / ".x.lock", "the thing"):
        pass


def test_second_prepare_and_index_build_are_refused(tmp_path, capsys):
    from test_prepare import make_manifest

    manifest = make_manifest(tmp_path)
    cache = tmp_path / "cache"
    assert rvl_main(["prepare", str(manifest), "--out", str(cache), "--size", "32", "--workers", "0",
                     "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")}
    proc = hold_lock(cache / ".prepare.lock")
    try:
        code = rvl_main(["prepare", str(manifest), "--out", str(cache), "--size", "48", "--workers", "0",
                         "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "being written by another process" in err and ".prepare.lock" in err
        code = rvl_main(["prepare", str(manifest), "--out", str(cache), "--size", "32", "--repair"])
        assert code == 2 and "being written by another process" in capsys.readouterr().err
    finally:
        release(proc)
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")} == before

    proc = hold_lock(tmp_path / ".idx.lock")
    try:
        code = rvl_main(["index", "build", "--model", str(tmp_path / "no-model"), "--data", str(cache), "--out",
                         str(tmp_path / "idx")])
        assert code == 2 and "the index" in capsys.readouterr().err
    finally:
        release(proc)
    assert not (tmp_path / "idx").exists()


def test_second_pretrain_on_a_run_folder_is_refused(tmp_path, capsys):
    from test_prepare import make_manifest

    manifest = make_manifest(tmp_path)
    proc = hold_lock(tmp_path / "run" / ".pretrain.lock")
    try:
        code = rvl_main(["pretrain", "--data", str(manifest), "--output-dir", str(tmp_path / "run"), "--model",
                         "rvl-tiny", "--max-steps", "1", "--cpu", "--log-with", "none"])
        assert code == 2 and "the run folder" in capsys.readouterr().err
    finally:
        release(proc)
    assert not (tmp_path / "run" / "checkpoints").exists()
