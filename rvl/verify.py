"""``rvl verify PATH``: check every file of the rvl artifacts under PATH against the checksums recorded at write time.

Artifacts are found by their headers: a prepared cache (``prepare.json``), an index (``index.json``), an exported model
or a checkpoint (``checksums.json``), a label output (``OUT.sha256`` sidecar). A run folder of ``rvl pretrain`` holds
several (``checkpoints/*``, ``model``); a demo folder too. One line per file: ``ok``, ``corrupt`` (with the expected and
found hash or size), ``missing`` or ``extra`` (a file inside an artifact that its table does not list). Exit status
0 when every file is ok, 1 on any problem, 2 when PATH holds no rvl artifact.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rvl.integrity import (CHECKSUMS_NAME, SIDECAR_SUFFIX, FileStatus, IntegrityError, check_files, check_seal,
                           file_digest, read_checksums, read_sidecar)

__all__ = ["verify_path", "add_arguments", "run"]

CACHE_HEADER, INDEX_HEADER = "prepare.json", "index.json"
# files whose presence marks a folder as an artifact even when its header / checksum table is gone
_MARKERS = {"cache": ("dataset/state.json", "dataset/dataset_info.json"), "index": ("index.faiss", "metadata.parquet"),
            "folder": ("open_clip_config.json", "model.safetensors", "random_states_0.pkl")}


def _artifact_kind(folder: Path) -> str | None:
    from rvl.finetune.outputs import is_finetune_folder

    if is_finetune_folder(folder):
        return "finetune"
    if (folder / CACHE_HEADER).is_file() or any((folder / m).exists() for m in _MARKERS["cache"]):
        return "cache"
    if (folder / INDEX_HEADER).is_file() or any((folder / m).exists() for m in _MARKERS["index"]):
        return "index"
    if (folder / CHECKSUMS_NAME).is_file() or any((folder / m).exists() for m in _MARKERS["folder"]):
        return "folder"
    return None


def _header_table(folder: Path, header: str) -> tuple[dict | None, FileStatus | None]:
    """The checked file table inside a JSON header (``prepare.json`` / ``index.json``), or the header's status."""
    path = folder / header
    if not path.is_file():
        return None, FileStatus(header, "missing")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return check_seal(record.get("checksums") if isinstance(record, dict) else None, path), None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, FileStatus(header, "corrupt", f"unreadable JSON ({err})")
    except IntegrityError as err:
        return None, FileStatus(header, "corrupt", err.problem)


def _verify_artifact(folder: Path, kind: str) -> list[FileStatus]:
    if kind == "finetune":
        return _verify_finetune(folder)
    if kind == "folder":
        try:
            table = read_checksums(folder)
        except IntegrityError as err:
            return [FileStatus(CHECKSUMS_NAME, "corrupt", err.problem)]
        if table is None:
            return [FileStatus(CHECKSUMS_NAME, "missing")]
        return [FileStatus(CHECKSUMS_NAME, "ok"), *check_files(folder, table)]
    header = CACHE_HEADER if kind == "cache" else INDEX_HEADER
    table, problem = _header_table(folder, header)
    if problem is not None:
        return [problem]
    out = [FileStatus(header, "ok"), *check_files(folder, table, ignore=[header], extras=kind == "index")]
    if kind == "cache":
        out.extend(FileStatus(rel, "extra") for rel in _cache_extras(folder, table))
        out.extend(_cache_shards(folder))
    return out


def _verify_finetune(folder: Path) -> list[FileStatus]:
    """An ``rvl finetune`` folder: its table (checkpoints excluded: they are checked as artifacts of their own) and
    each run's sealed ``result.json``."""
    from rvl.finetune.outputs import read_result, table_files

    try:
        table = read_checksums(folder)
    except IntegrityError as err:
        return [FileStatus(CHECKSUMS_NAME, "corrupt", err.problem)]
    out = [FileStatus(CHECKSUMS_NAME, "missing")] if table is None else \
        [FileStatus(CHECKSUMS_NAME, "ok"), *check_files(folder, table, extras=False)]
    listed = set(table["files"]) if table else set()
    out.extend(FileStatus(rel, "extra", "not in checksums.json (written by an interrupted run?)")
               for rel in table_files(folder) if rel not in listed)
    for result in sorted(folder.glob("runs/*/result.json")):
        rel = result.relative_to(folder).as_posix()
        try:
            read_result(result)
        except IntegrityError as err:
            if not any(s.path == rel and s.status != "ok" for s in out):
                out.append(FileStatus(rel, "corrupt", err.problem))
    return out


def _cache_extras(folder: Path, table: dict) -> list[str]:
    dataset = folder / "dataset"
    listed = set(table["files"])
    return sorted(p.relative_to(folder).as_posix() for p in dataset.glob("*")
                  if p.is_file() and not p.name.startswith(".") and p.relative_to(folder).as_posix() not in listed)


def _cache_shards(folder: Path) -> list[FileStatus]:
    """Resumable shards kept with --keep-shards: each checked against the hash in its ``.skipped.json``."""
    from rvl.data.cache_shards import shard_arrow_intact

    shard_dir = folder / "shards"
    if not shard_dir.is_dir():
        return []
    out = []
    for record in sorted(shard_dir.glob("*.skipped.json")):
        arrow = shard_dir / record.name.replace(".skipped.json", ".arrow")
        intact = shard_arrow_intact(shard_dir, arrow.stem)
        out.append(FileStatus(f"shards/{arrow.name}", "ok" if intact else "missing" if not arrow.exists() else
                              "corrupt", "" if intact else "rebuilt by the next `rvl prepare`"))
    out.extend(FileStatus(f"shards/{p.name}", "corrupt", "no .skipped.json record; rebuilt by the next `rvl prepare`")
               for p in sorted(shard_dir.glob("*.arrow"))
               if not (shard_dir / p.name.replace(".arrow", ".skipped.json")).exists())
    return out


def _verify_sidecar(path: Path) -> list[FileStatus]:
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if not path.is_file():
        return [FileStatus(path.name, "missing")]
    try:
        expected = read_sidecar(path)
    except IntegrityError as err:
        return [FileStatus(sidecar.name, "missing" if not sidecar.exists() else "corrupt", err.problem)]
    found = file_digest(path)
    return [FileStatus(path.name, "ok" if found == expected else "corrupt",
                       "" if found == expected else f"expected sha256 {expected}, found {found}")]


def verify_path(path: str | Path) -> list[tuple[Path, list[FileStatus]]]:
    """(artifact root, statuses) for every rvl artifact at or under ``path``; empty when there is none."""
    path = Path(path)
    if not path.is_dir():  # a label output (or its sidecar); a deleted output whose sidecar remains is "missing"
        target = path.with_name(path.name.removesuffix(SIDECAR_SUFFIX))
        sidecar = target.with_name(target.name + SIDECAR_SUFFIX)
        return [(target, _verify_sidecar(target))] if target.exists() or sidecar.exists() else []
    found, stack = [], [path]
    while stack:
        folder = stack.pop()
        kind = _artifact_kind(folder)
        if kind is not None:
            found.append((folder, _verify_artifact(folder, kind)))
            if kind == "finetune":  # each checkpoint of a full fine-tuning run is an artifact of its own
                stack.extend(sorted((p for p in folder.glob("runs/*/checkpoints/*")
                                     if p.is_dir() and not p.name.startswith(".")), reverse=True))
            continue
        children = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), reverse=True)
        for child in children:
            if child.is_dir():
                stack.append(child)
            elif child.name.endswith(SIDECAR_SUFFIX):
                target = child.with_name(child.name.removesuffix(SIDECAR_SUFFIX))
                found.append((target, _verify_sidecar(target)))
    return sorted(found, key=lambda item: str(item[0]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="artifact folder (cache, run dir, model, checkpoint, index) or label output file")
    parser.add_argument("--quiet", action="store_true", help="print only the files that are not ok")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists() and not path.with_name(path.name + SIDECAR_SUFFIX).exists():
        print(f"rvl verify: error: {path} does not exist", file=sys.stderr)
        return 2
    results = verify_path(path)
    if not results:
        print(f"rvl verify: error: no rvl artifact (prepare.json, index.json, checksums.json or *.sha256) at or "
              f"under {path}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for root, statuses in results:
        for status in statuses:
            counts[status.status] = counts.get(status.status, 0) + 1
            if status.status != "ok" or not args.quiet:
                shown = root / status.path if root.is_dir() else root
                print(f"{status.status:<8} {shown}" + (f"  ({status.detail})" if status.detail else ""))
    problems = sum(n for s, n in counts.items() if s != "ok")
    print(f"{len(results)} artifact(s), {sum(counts.values())} file(s): "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=sys.stderr)
    return 1 if problems else 0
