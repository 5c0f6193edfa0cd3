"""``rvl prepare``: read every image once into a resized on-disk cache of studies.

Layout of the output folder ``DIR``:

- ``DIR/dataset``: a ``datasets`` dataset (``save_to_disk``), one row per study: every manifest column plus
  ``pixels`` (list of raw uint8 ``size*size`` row-major buffers, aligned with ``image_paths``; long side resized to
  ``size``, aspect kept, centred zero padding). ``finding_boxes`` are re-expressed in that padded square frame.
  Images that failed to read are dropped from their study (and from ``image_paths``/``view_positions``); a study
  with no readable image is dropped.
- ``DIR/prepare.json``: size, counts, source manifest, the content fingerprint of the run and the sealed sha256 of every
  file of the cache (``checksums``), checked by every reader as it opens the cache (:mod:`rvl.data.cache_files`).
- ``DIR/skipped.csv``: ``path, study_id, reason`` for every image that failed.

Re-running skips work already done: studies are processed in fixed-size shards, each named by a fingerprint of its
rows, the cache size and every image file's size and mtime, and written atomically to ``DIR/shards/`` as soon as it
is complete, with its sha256. An interrupted run resumes from the finished shards that still match their checksum; a
finished run (``prepare.json`` holding the same overall fingerprint) returns immediately once its files check out. A
changed study or image only invalidates its shard. The shards are deleted after the final atomic swap of
``DIR/dataset`` unless ``keep_shards=True`` (which keeps later incremental re-runs
cheap at the cost of twice the disk space).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rvl.fileio import OutputBusyError, exclusive_output, write_text_atomic
from rvl.integrity import IntegrityError, file_table

from rvl.data.cache_files import load_cache, read_cache_frame, verify_cache  # noqa: F401  (re-exported: reading side)
from rvl.data.cache_shards import CACHE_VERSION, cache_schema, plan_shards, save_dataset, shard_arrow_intact
from rvl.data.cache_shards import prepare_study as _prepare_study
from rvl.data.cache_shards import write_shard as _write_shard

__all__ = ["PrepareError", "prepare", "read_cache_frame", "load_cache", "add_arguments", "run", "CACHE_VERSION"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_STUDIES = 256


class PrepareError(RuntimeError):
    """A fatal problem while preparing the cache (with ``strict``, the first unreadable image)."""


# ----------------------------------------------------------------------------------------------------------- prepare
def prepare(manifest: str | os.PathLike | Any, out_dir: str | os.PathLike, size: int = 256, workers: int | None = None,
            strict: bool = False, format: str = "auto", shard_studies: int = DEFAULT_SHARD_STUDIES,
            keep_shards: bool = False, progress: bool = True, max_shard_size: int | str | None = None,
            labels: str = "auto",
            **reader_kwargs: Any) -> dict[str, Any]:
    """Read every image of a manifest once into a resized on-disk ``datasets`` cache (see the module docstring).

    Args:
        manifest: anything ``read_manifest`` accepts (path in any supported format, or an already-read DataFrame).
        out_dir: output folder (created).
        size: side of the square cache images.
        workers: reader processes; default the number of usable CPUs; 0/1 reads in this process.
        strict: raise ``PrepareError`` on the first unreadable image instead of skipping it.
        format: manifest format for ``read_manifest``.
        shard_studies: studies per resumable shard.
        keep_shards: keep ``DIR/shards`` after finishing (cheap incremental re-runs, twice the disk space).
        progress: tqdm progress bar.
        labels: CheXpert labels for studies without them (:func:`rvl.data.labels.fill_labels`): ``auto`` (label
            the reports with ``rvl.nlp`` when the manifest has no labels), ``nlp``, ``keep`` or ``none``.
        max_shard_size: largest data file of ``DIR/dataset`` (``datasets`` default 500 MB); ``--repair`` rebuilds
            whole data files, so smaller files make a repair cheaper.
        **reader_kwargs: passed to ``read_manifest`` (e.g. ``reports=`` for a DICOM folder).

    Returns:
        Summary dict (counts, timings, whether shards were reused); also written to ``DIR/prepare.json``.

    Raises:
        OutputBusyError: another ``rvl prepare`` is writing ``out_dir`` (``DIR/.prepare.lock``): refused at once.
    """
    with exclusive_output(Path(out_dir) / ".prepare.lock", f"the cache {out_dir}"):
        return _prepare(manifest, Path(out_dir), size, workers, strict, format, shard_studies, keep_shards, progress,
                        max_shard_size, reader_kwargs, labels)


def _prepare(manifest: Any, out_dir: Path, size: int, workers: int | None, strict: bool, format: str,
             shard_studies: int, keep_shards: bool, progress: bool, max_shard_size: int | str | None,
             reader_kwargs: dict[str, Any], labels: str = "auto") -> dict[str, Any]:
    """:func:`prepare` under the output lock."""
    import pandas as pd
    from tqdm.auto import tqdm

    from rvl.data.labels import MEMO_NAME, fill_labels
    from rvl.data.manifest import read_manifest

    start = time.perf_counter()
    if size < 8:
        raise PrepareError(f"size must be >= 8, got {size}")
    frame = manifest.reset_index(drop=True) if isinstance(manifest, pd.DataFrame) else \
        read_manifest(manifest, format=format, **reader_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame, label_summary = fill_labels(frame, labels, progress=progress, memo=out_dir / MEMO_NAME)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".*.tmp-*"), *shard_dir.glob(".*.tmp-*")]:  # left by a killed run (we hold the lock)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    records, bounds, shard_fps, fingerprint = plan_shards(frame, size, shard_studies)
    info_path, dataset_dir = out_dir / "prepare.json", out_dir / "dataset"
    if info_path.exists() and dataset_dir.exists():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == fingerprint:
            verify_cache(out_dir)  # an up-to-date cache must also be intact: IntegrityError names the file
            if strict and info.get("n_skipped_images"):
                with open(out_dir / "skipped.csv", newline="") as f:
                    first = next(csv.DictReader(f))
                raise PrepareError(f"{first['path']}: {first['reason']} (study {first['study_id']})")
            info.update(up_to_date=True, seconds=round(time.perf_counter() - start, 2),  # this run's labeler work
                        labels={**info.get("labels", {}),
                                "reports_read_by_labeler": label_summary["reports_read_by_labeler"]})
            return info

    schema = cache_schema(frame)
    todo = [k for k, fp in enumerate(shard_fps) if not (shard_dir / f"{fp}.arrow").exists()]
    for k in sorted(set(range(len(shard_fps))) - set(todo)):  # a finished shard altered on disk is built again
        if not shard_arrow_intact(shard_dir, shard_fps[k]):
            logger.warning("shard %s does not match its checksum; rebuilding it", shard_dir / f"{shard_fps[k]}.arrow")
            todo.append(k)
    todo.sort()
    if strict:  # a finished shard from an earlier lenient run may hold failures that strict mode must not accept
        for k in sorted(set(range(len(shard_fps))) - set(todo)):
            skipped = json.loads((shard_dir / f"{shard_fps[k]}.skipped.json").read_text())["skipped"]
            if skipped:
                raise PrepareError(f"{skipped[0]['path']}: {skipped[0]['reason']} (study {skipped[0]['study_id']})")
    n_workers = _default_workers() if workers is None else int(workers)
    tasks = [(row, records[row]["image_paths"], records[row]["finding_boxes"], size)
             for k in todo for row in range(*bounds[k])]
    bar = tqdm(total=len(records), initial=len(records) - len(tasks), unit="study", desc="prepare",
               disable=not progress, dynamic_ncols=True)
    pending: dict[int, dict[int, tuple]] = {k: {} for k in todo}
    shard_of_row = {row: k for k in todo for row in range(*bounds[k])}
    pool = multiprocessing.get_context().Pool(min(n_workers, len(tasks))) if n_workers > 1 and len(tasks) > 1 \
        else None
    try:
        results = pool.imap(_prepare_study, tasks, chunksize=4) if pool else map(_prepare_study, tasks)
        for row, pixels, kept, boxes, failures, sizes in results:
            if strict and failures:
                path, reason = failures[0]
                raise PrepareError(f"{path}: {reason} (study {records[row]['study_id']})")
            k = shard_of_row[row]
            pending[k][row] = (pixels, kept, boxes, failures, sizes)
            bar.update(1)
            if len(pending[k]) == bounds[k][1] - bounds[k][0]:
                _write_shard(shard_dir, shard_fps[k], frame.iloc[bounds[k][0]:bounds[k][1]], pending.pop(k), schema)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    info = _finalize(out_dir, shard_dir, shard_fps, fingerprint, progress, max_shard_size)
    info.update(checksums=file_table(out_dir, [*info.pop("files"), "skipped.csv"]))
    info.update(size=size, fingerprint=fingerprint, source_manifest=str(manifest) if not isinstance(
        manifest, pd.DataFrame) else "<DataFrame>", format=format, cache_version=CACHE_VERSION,
        shard_studies=shard_studies, shards_reused=len(shard_fps) - len(todo), shards_built=len(todo),
        workers=n_workers, labels=label_summary, seconds=round(time.perf_counter() - start, 2), up_to_date=False)
    write_text_atomic(info_path, json.dumps(info, indent=2))
    if not keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    else:  # drop shards of earlier manifests / sizes that this run no longer uses
        current = set(shard_fps)
        for stale in shard_dir.iterdir():
            if stale.name.split(".")[0] not in current:
                stale.unlink(missing_ok=True)
    return info


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _finalize(out_dir: Path, shard_dir: Path, shard_fps: list[str], fingerprint: str, progress: bool,
              max_shard_size: int | str | None) -> dict[str, Any]:
    """Concatenate the shards into DIR/dataset (atomic swap) and write DIR/skipped.csv."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return _concatenate_shards(out_dir, shard_dir, shard_fps, fingerprint, max_shard_size)
    finally:
        if bars_were_on and not progress:
            datasets.enable_progress_bars()


def _concatenate_shards(out_dir: Path, shard_dir: Path, shard_fps: list[str], fingerprint: str,
                        max_shard_size: int | str | None) -> dict[str, Any]:
    import datasets

    parts = [datasets.Dataset.from_file(str(shard_dir / f"{fp}.arrow")) for fp in shard_fps]
    parts = [p for p in parts if len(p)] or parts[:1]
    if not parts:
        raise PrepareError("the manifest has no studies")
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(data) == 0:
        raise PrepareError(f"no readable image in any study; see {out_dir / 'skipped.csv'}")
    skipped, dropped, dropped_rows = [], 0, []
    for fp in shard_fps:
        record = json.loads((shard_dir / f"{fp}.skipped.json").read_text())
        skipped.extend(record["skipped"])
        dropped += record["dropped_studies"]
        dropped_rows.extend(record.get("dropped_rows", []))
    tmp_csv = out_dir / f".skipped.csv.tmp-{os.getpid()}"
    with open(tmp_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "study_id", "reason"])
        writer.writeheader()
        writer.writerows(skipped)
    os.replace(tmp_csv, out_dir / "skipped.csv")

    data_files, rows = save_dataset(data, out_dir, fingerprint, max_shard_size=max_shard_size)
    del data, parts  # release the memory maps of the shards before they are deleted
    n_images = 0
    loaded = datasets.load_from_disk(str(out_dir / "dataset"))
    for batch in loaded.select_columns(["view_positions"]).iter(batch_size=4096):
        n_images += sum(len(v) for v in batch["view_positions"])
    return {"n_studies": len(loaded), "n_images": n_images, "n_skipped_images": len(skipped),
            "n_dropped_studies": dropped, "dropped_rows": sorted(dropped_rows), "data_file_rows": rows,
            "files": [*data_files, "dataset/state.json", "dataset/dataset_info.json"]}


# --------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="study manifest (.parquet/.csv/.jsonl, HF dataset folder) or a dataset "
                        "root/file in another --format")
    parser.add_argument("--out", required=True, help="output folder (DIR/dataset, DIR/prepare.json, DIR/skipped.csv)")
    parser.add_argument("--size", type=int, default=256, help="side of the square cache images (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="reader processes (default: all usable CPUs)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image (exit 2)")
    parser.add_argument("--format", default="auto", choices=["auto", "rvl", "mimic", "iu", "chexpert",
                                                             "dicom-folder"], help="manifest / dataset layout")
    parser.add_argument("--reports", default=None, help="reports CSV for --format dicom-folder (keyed by study "
                        "instance UID or accession number)")
    parser.add_argument("--image-column", default="image_paths", help="rvl manifests: list column of the image "
                        "files to read (e.g. dicom_paths from `rvl phantoms --format both`)")
    parser.add_argument("--shard-studies", type=int, default=DEFAULT_SHARD_STUDIES,
                        help="studies per resumable shard")
    parser.add_argument("--keep-shards", action="store_true", help="keep DIR/shards for cheap incremental re-runs")
    parser.add_argument("--max-shard-size", default=None, help="largest data file of DIR/dataset, e.g. 200MB "
                        "(default 500MB): --repair rebuilds whole data files, so smaller files make a repair cheaper")
    parser.add_argument("--repair", action="store_true", help="check DIR against the checksums in prepare.json and "
                        "rebuild only the damaged or missing data files (from the same manifest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--labels", choices=["auto", "nlp", "keep", "none"], default="auto",
                        help="CheXpert labels: auto (default) labels the reports with rvl.nlp when the manifest has "
                        "no label values; nlp labels every study without labels; keep uses the manifest's as they "
                        "are; none trains without labels. Labels given in the manifest are never overwritten.")


def run(args: argparse.Namespace) -> int:
    from rvl.data.manifest import ManifestError

    kwargs: dict[str, Any] = {"reports": args.reports} if args.reports else {}
    if args.image_column != "image_paths":
        kwargs["image_column"] = args.image_column
    if args.repair:
        return _run_repair(args, kwargs)
    try:
        info = prepare(args.manifest, args.out, size=args.size, workers=args.workers, strict=args.strict,
                       format=args.format, shard_studies=args.shard_studies, keep_shards=args.keep_shards,
                       progress=not args.no_progress, max_shard_size=args.max_shard_size, labels=args.labels,
                       **kwargs)
    except (PrepareError, ManifestError, FileNotFoundError, IntegrityError, OutputBusyError, ValueError) as e:
        print(f"rvl prepare: error: {e}", file=sys.stderr)
        return 2
    if info.get("up_to_date"):
        print(f"{args.out}: already up to date ({info['n_studies']} studies, {info['n_images']} images at "
              f"{info['size']} px)")
        return 0
    print(f"prepared {info['n_studies']} studies ({info['n_images']} images, {info['size']} px) in {info['seconds']} s "
          f"into {args.out}/dataset; skipped {info['n_skipped_images']} image(s)"
          + (f" and dropped {info['n_dropped_studies']} study/studies with no readable image"
             if info["n_dropped_studies"] else "")
          + (f" (see {args.out}/skipped.csv)" if info["n_skipped_images"] else "")
          + (f"; reused {info['shards_reused']} finished shard(s)" if info["shards_reused"] else ""))
    by_source = info["labels"]["rows_by_source"]
    print("labels: " + ", ".join(f"{n} studies from {source}" for source, n in by_source.items()))
    return 0



def _run_repair(args: argparse.Namespace, reader_kwargs: dict[str, Any]) -> int:
    from rvl.data.cache_repair import repair_cache
    from rvl.data.manifest import ManifestError

    try:
        info = repair_cache(args.manifest, args.out, PrepareError, format=args.format,
                            progress=not args.no_progress, **reader_kwargs)
    except (PrepareError, ManifestError, FileNotFoundError, IntegrityError, OutputBusyError) as e:
        print(f"rvl prepare --repair: error: {e}", file=sys.stderr)
        return 2
    if not info["repaired"]:
        print(f"{args.out}: nothing to repair, all {len(info['checksums']['files'])} files match their checksums")
    else:
        print(f"{args.out}: rebuilt {', '.join(info['repaired'])} in {info['seconds']} s; "
              + (f"new checksums recorded for {', '.join(info['differ'])} (sources changed)" if info["differ"] else
                 "every file matches the checksum recorded when the cache was written"))
    return 0
