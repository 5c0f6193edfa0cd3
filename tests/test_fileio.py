"""Crash-safe writes: a replaced folder or file ends with the new content and leaves no temporary siblings."""
from __future__ import annotations

from rvl.fileio import replace_dir, write_text_atomic


def test_replace_dir_swaps_in_the_new_folder(tmp_path):
    final, tmp = tmp_path / "model", tmp_path / ".model.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    replace_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp / .old-* left behind
    fresh = tmp_path / ".other.tmp"
    fresh.mkdir()
    replace_dir(fresh, tmp_path / "other")  # no previous folder: a plain rename
    assert (tmp_path / "other").is_dir() and not fresh.exists()


def test_write_text_atomic_overwrites_without_leftovers(tmp_path):
    target = tmp_path / "metrics.json"
    write_text_atomic(target, "{}")
    write_text_atomic(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
