"""Crash-safe writes shared by the cache, checkpoints, model export, evaluation and the demo.

A file is written next to its target and renamed over it (``os.replace`` is atomic on one file system); a folder is
built complete under a temporary name and swapped in, so a kill at any moment leaves either the old or the new
version, never a half-written one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["OutputBusyError", "exclusive_output", "raise_if_disk_full", "remove_temporaries", "replace_dir",
           "write_atomic", "write_json_atomic", "write_text_atomic"]

# Below this much free space a failed write is reported as a full disk: torch and some C writers report ENOSPC as
# "iostream error" / "unexpected pos" without the errno.
LOW_SPACE_BYTES = 16 << 20


class OutputBusyError(RuntimeError):
    """Another process is writing the same output (its lock is held); nothing was written."""


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path`` (``.NAME.tmp-PID`` + ``suffix``, for writers that
    insist on an extension), then rename it over ``path``; on any failure the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no partial file behind
        raise
    return path


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Remove the hidden temporaries (``.NAME.tmp-*``, ``.NAME.old-*``) that killed writers left anywhere under
    ``folder``; only for a caller holding the folder's output lock. Returns how many were removed."""
    found = [p for p in Path(folder).rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    for path in sorted(found, key=lambda p: len(p.parts)):  # a folder before what it holds
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(found)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a hidden temporary file in the same folder and one rename."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON (numpy scalars/arrays and paths converted) with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``final``.

    A folder cannot replace an existing one in a single rename, so an existing ``final`` is first renamed aside (a
    hidden ``.NAME.old-*`` sibling) and deleted after the swap.
    """
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive_output(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (``filelock``; an OS lock, released when the process dies) while one
    command writes an output; a second writer is refused at once instead of interleaving its files.

    Raises:
        OutputBusyError: the lock is held by another process (the message names ``what`` and the lock file).
    """
    from filelock import FileLock, Timeout

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputBusyError(f"{what} is being written by another process (lock {lock_path} is held); wait for it "
                              "to finish, then run this command again") from None
    try:
        yield
    finally:
        lock.release()


def raise_if_disk_full(folder: str | os.PathLike, err: BaseException, what: str) -> None:
    """Re-raise a failed write as ``OSError(ENOSPC)`` (with ``what`` and the original error) when ``folder``'s file
    system is (nearly) full, so the CLI reports a full disk instead of a library's internal error."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < LOW_SPACE_BYTES:
        raise OSError(errno.ENOSPC, f"No space left on device while writing {what} ({free} bytes free; "
                                    f"{type(err).__name__}: {err})") from err
