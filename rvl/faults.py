"""Fault injection for the reliability tests and ``bench/fault_matrix.py``: damaged files and failing writes.

Every function is seeded, so a failing matrix cell can be replayed exactly.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
from pathlib import Path
from typing import Iterator

__all__ = ["CORRUPTIONS", "corrupt", "flip_bytes", "scribble", "truncate", "delete", "small_tmpfs", "file_size_limit"]


def flip_bytes(path: str | os.PathLike, n: int = 8, seed: int = 0) -> None:
    """Invert ``n`` bytes at seeded positions (a silent media error)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for pos in rng.sample(range(len(data)), min(n, len(data))):
        data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def scribble(path: str | os.PathLike, n: int = 4096, seed: int = 0) -> None:
    """Overwrite ``n`` bytes in the middle of a file with random bytes (the case of issue 16), size unchanged."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    n = min(n, len(data))
    start = (len(data) - n) // 2
    data[start:start + n] = random.Random(seed).randbytes(n)
    path.write_bytes(bytes(data))


def truncate(path: str | os.PathLike, seed: int = 0) -> None:
    """Cut a file at a seeded point in its second half (an interrupted copy)."""
    path = Path(path)
    size = path.stat().st_size
    os.truncate(path, random.Random(seed).randrange(size // 2, size) if size > 1 else 0)


def delete(path: str | os.PathLike, seed: int = 0) -> None:
    """Remove a file (a lost file)."""
    Path(path).unlink()


CORRUPTIONS = {"flip": flip_bytes, "truncate": truncate, "delete": delete}


def corrupt(path: str | os.PathLike, kind: str, seed: int = 0) -> None:
    """Apply the named corruption (``flip``, ``truncate``, ``delete``, ``scribble``) to one file."""
    if kind == "scribble":
        scribble(path, seed=seed)
    else:
        CORRUPTIONS[kind](path, seed=seed)


@contextlib.contextmanager
def small_tmpfs(path: str | os.PathLike, size_kb: int) -> Iterator[Path]:
    """Mount a ``size_kb`` tmpfs at ``path`` (root on Linux) so writes past it fail with a real ENOSPC.

    Raises:
        OSError: the machine does not allow mounting (callers fall back to :func:`file_size_limit`).
    """
    import subprocess

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise OSError(errno.EPERM, f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def file_size_limit(n_bytes: int):
    """A ``preexec_fn`` for subprocess: any file growing past ``n_bytes`` fails its write (EFBIG), in Python and C code
    alike (the injected disk-full fault where no tmpfs can be mounted)."""
    def limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit
