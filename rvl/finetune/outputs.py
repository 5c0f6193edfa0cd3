"""Integrity of an ``rvl finetune`` output folder: every file it writes is checksummed, every reader checks.

- ``FT/checksums.json``: the sealed table (``rvl.integrity``) of every file of the folder except the checkpoints (which
  carry their own ``checksums.json``), updated with each file this process writes. ``rvl verify FT`` checks it, each
  result's seal and each checkpoint.
- ``FT/runs/<run>/result.json`` is itself sealed and records the sha256 of the run's predictions and CAM overlays, so
  a finished run is trusted (and put back in the table) only when it and its files are intact, even when a kill came
  between writing it and updating the table, or the table was deleted.
- The frozen embeddings cache (``FT/embeddings/*.npz``) is checked against the table before it is used; one the table
  does not list (written by a run killed before the table was rewritten) is computed again.
- Full fine-tuning checkpoints are checked before ``--resume`` loads them (``rvl.train_support.verify_checkpoint``).

A mismatch raises :class:`rvl.integrity.IntegrityError` naming the file, both hashes and what to delete to rebuild.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from rvl.fileio import remove_temporaries, write_atomic, write_text_atomic
from rvl.integrity import (ALGORITHM, CHECKSUMS_NAME, IntegrityError, all_files, file_digest, file_table,
                           read_checksums, read_sealed_json, require_intact, seal, write_sealed_json)

__all__ = ["adopt_run", "clean_temporaries", "file_hashes", "is_finetune_folder", "load_embeddings", "read_result",
           "read_table", "save_embeddings", "seal_outputs", "table_files", "write_result"]

logger = logging.getLogger(__name__)


def is_finetune_folder(folder: Path) -> bool:
    """Whether ``folder`` is an ``rvl finetune --output-dir`` (it has ``runs/`` and ``subsets/``)."""
    return (folder / "runs").is_dir() and (folder / "subsets").is_dir()


def _is_checkpoint_file(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) > 3 and parts[0] == "runs" and parts[2] == "checkpoints"


def table_files(out_dir: Path) -> list[str]:
    """The files the table covers when complete: everything but checkpoints, hidden files and the table itself."""
    return [rel for rel in all_files(out_dir, exclude=[CHECKSUMS_NAME]) if not _is_checkpoint_file(rel)]


def seal_outputs(out_dir: Path, relpaths: list[str]) -> None:
    """Record the files ``relpaths`` (written or checked by this process) in ``FT/checksums.json``.

    Entries of other files are kept as they are: a file is never listed on the strength of being there (a damaged
    file would be blessed), only after this process wrote it or checked it against a record it trusts.
    """
    table = read_table(out_dir)
    files = dict(table["files"]) if table else {}
    # a deleted embeddings cache is no loss (it is computed again when a run needs it): it leaves the table
    files = {rel: entry for rel, entry in files.items()
             if not rel.startswith("embeddings/") or (out_dir / rel).is_file()}
    files.update(file_table(out_dir, relpaths)["files"])
    write_text_atomic(out_dir / CHECKSUMS_NAME, json.dumps(seal({"algorithm": ALGORITHM, "files": files}), indent=1))


def read_table(out_dir: Path) -> dict[str, Any] | None:
    """The checked table, or None when there is none yet (first run) or it was deleted."""
    return read_checksums(out_dir, rebuild=f"delete {out_dir / CHECKSUMS_NAME} and rerun rvl finetune --resume (every "
                          "finished run is re-checked against its own sealed record, every cache recomputed)")


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a run's ``result.json`` sealed (the sha256 of its own content under ``seal``)."""
    write_sealed_json(path, result)


def file_hashes(out_dir: Path, paths: list[Path]) -> dict[str, str]:
    """``{path relative to FT: sha256}`` of files a run wrote (recorded in its sealed result)."""
    return {Path(p).relative_to(out_dir).as_posix(): file_digest(p) for p in sorted(paths)}


def adopt_run(out_dir: Path, result_path: Path) -> list[str]:
    """Check a finished run's record and the files it lists (predictions, CAM overlays) against the hashes in it;
    returns their paths relative to FT, for the table (which a kill or a deleted table may have left without them).
    """
    result = read_result(result_path)
    rebuild = f"delete {result_path.parent} and rerun rvl finetune --resume (that run is trained again)"
    for rel, digest in result.get("files", {}).items():
        path = out_dir / rel
        if not path.is_file():
            raise IntegrityError(path, "missing (written by a finished run)", rebuild=rebuild)
        found = file_digest(path)
        if found != digest:
            raise IntegrityError(path, "content does not match its checksum", digest, found, rebuild)
    cached = []  # the embeddings cache a linear probe read: listed again when intact; when gone it is recomputed
    for rel, digest in result.get("inputs", {}).items():
        path = out_dir / rel
        if path.is_file():
            found = file_digest(path)
            if found != digest:
                raise IntegrityError(path, "content does not match its checksum", digest, found,
                                     f"delete {path} and rerun rvl finetune --resume (it is computed again)")
            cached.append(rel)
    return [result_path.relative_to(out_dir).as_posix(), *result.get("files", {}), *cached]


def read_result(path: Path) -> dict[str, Any]:
    """A finished run's record, after checking its seal."""
    return read_sealed_json(path, "result record",
                            f"delete {path.parent} and rerun rvl finetune --resume (that run is trained again)")


def load_embeddings(out_dir: Path, path: Path, names: list[str]) -> dict[str, dict[str, np.ndarray]] | None:
    """The cached embeddings at ``path`` checked against the table, or None when they must be computed (absent, or
    not listed: written by a run that was killed before the table was rewritten)."""
    if not path.is_file():
        return None
    rel = path.relative_to(out_dir).as_posix()
    table = read_table(out_dir)
    if table is None or rel not in table["files"]:
        logger.info("%s is not in %s (an interrupted run?): computing it again", rel, CHECKSUMS_NAME)
        return None
    require_intact(out_dir, table, f"delete {path} and rerun rvl finetune --resume (it is computed again)",
                   only=[rel])
    with np.load(path) as cached:
        return {name: {"features": cached[f"{name}_features"], "study_id": cached[f"{name}_study_id"]}
                for name in names}


def save_embeddings(path: Path, out: dict[str, dict[str, np.ndarray]]) -> None:
    """Write the embeddings cache atomically (a hidden temporary file, then one rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{n}_{k}": v for n, d in out.items() for k, v in d.items()}
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")  # np.savez appends .npz otherwise


def clean_temporaries(out_dir: Path) -> int:
    """Remove the hidden temporaries a killed run left (the caller holds the folder's lock)."""
    found = remove_temporaries(out_dir)
    if found:
        logger.info("removed %d temporary file(s) left by an interrupted run", found)
    return found
