"""Crash-safe persistence of an index folder (``index.faiss`` + ``metadata.parquet`` + ``index.json``).

A save writes a complete new folder next to the target and swaps it in with two renames:

    DIR.tmp-XXXX  (written + fsynced)   ->   DIR  moved to  DIR.old-XXXX   ->   DIR.tmp-XXXX renamed to DIR

A kill before the first rename leaves the old ``DIR`` untouched; a kill between the two renames leaves no ``DIR`` but a
complete ``DIR.old-XXXX``, which :func:`resolve_index_dir` finds and loads (and the next save cleans up). Nothing is
pickled: the vectors go through ``faiss.write_index``, metadata through Parquet, the header through JSON.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
HEADER_FILE = "index.json"
REMOVED_FILE = "removed_ids.npy"  # optional: ids removed from HNSW / re-ranked / on-disk indexes, hidden at search
ON_DISK_LISTS_FILE = "index.ivfdata"  # optional: inverted lists of an on-disk IVF index (memory-mapped)
REQUIRED_FILES = (INDEX_FILE, METADATA_FILE, HEADER_FILE)


def _fsync_path(path: Path) -> None:
    """Flush a file (or directory entry table) to disk so a rename never exposes half-written data."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on platforms without O_DIRECTORY
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _siblings(target: Path, tag: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{tag}-*"), key=lambda p: p.stat().st_mtime, reverse=True)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds all three index files."""
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def atomic_write_dir(target: str | os.PathLike, write_files: Callable[[Path], None]) -> Path:
    """Write a folder atomically: ``write_files(tmp_dir)`` fills a fresh sibling, which then replaces ``target``.

    Args:
        target: Final folder path.
        write_files: Callback that writes every file into the folder it is given.

    Returns:
        The final folder path.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:10]
    tmp = target.parent / f".{target.name}.tmp-{token}"
    tmp.mkdir()
    try:
        write_files(tmp)
        _record_checksums(tmp)
        for child in tmp.iterdir():
            _fsync_path(child)
        _fsync_path(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            from rvl.fileio import raise_if_disk_full

            raise_if_disk_full(target.parent, err, f"the index {target}")  # faiss reports ENOSPC as a write error
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{token}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_path(target.parent)
    # The swap is done; leftovers of this save and of earlier interrupted saves are garbage now.
    for stale in [*( [old] if old else []), *_siblings(target, "old"), *_siblings(target, "tmp")]:
        shutil.rmtree(stale, ignore_errors=True)
    return target


REBUILD = "rvl index build --model MODEL --data DATA --out {}"
OPTIONAL_FILES = ("removed_ids.npy", "index.ivfdata")


def _record_checksums(folder: Path) -> None:
    """Add the sealed sha256 table of the data files to ``index.json`` (readers and ``rvl verify`` check it)."""
    from rvl.integrity import file_table

    header_path = folder / HEADER_FILE
    if header_path.is_file():
        header = read_json(header_path)
        optional = [n for n in OPTIONAL_FILES if (folder / n).is_file()]  # hidden removals, on-disk inverted lists
        header["checksums"] = file_table(folder, [n for n in REQUIRED_FILES if n != HEADER_FILE] + optional)
        write_json(header_path, header)


def verify_index_dir(folder: Path) -> None:
    """Check ``index.faiss`` and ``metadata.parquet`` against ``index.json``'s checksums (once per process).

    Raises:
        IntegrityError: a file was altered or ``index.json`` was edited (a ValueError: the CLIs report it, exit 2).
    """
    from rvl.integrity import IntegrityError, check_seal, require_intact

    rebuild = REBUILD.format(folder)
    try:
        header = read_json(folder / HEADER_FILE)
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(folder / HEADER_FILE, f"unreadable index header ({err})", rebuild=rebuild) from None
    if isinstance(header, dict) and "checksums" in header:  # indexes written before checksums load unchecked
        require_intact(folder, check_seal(header["checksums"], folder / HEADER_FILE, rebuild), rebuild)


def resolve_index_dir(path: str | os.PathLike) -> Path:
    """Return the folder to load: ``path`` itself, or the backup an interrupted save left beside it.

    Raises:
        FileNotFoundError: Neither a complete ``path`` nor a complete backup exists.
    """
    path = Path(path).absolute()
    if is_complete(path):
        verify_index_dir(path)
        return path
    for backup in _siblings(path, "old"):
        if is_complete(backup):
            verify_index_dir(backup)
            logger.warning("%s is missing or incomplete (interrupted save); loading the previous version %s",
                           path, backup.name)
            return backup
    if path.is_dir():
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        raise FileNotFoundError(f"{path} is not an rvl index folder: missing {', '.join(missing)}")
    raise FileNotFoundError(f"index folder {path} does not exist")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
