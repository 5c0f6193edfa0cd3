"""The two halves of one cache shard of ``rvl prepare``: reading a study's images (a worker task) and writing a
finished shard. Shared by :mod:`rvl.data.cache` (build, resume) and :mod:`rvl.data.cache_repair` (rebuild the studies of
a corrupt file), so that a repaired file holds exactly the bytes a fresh run writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import hashlib
import math
from typing import Any

import numpy as np

from rvl.fileio import replace_dir, write_text_atomic
from rvl.integrity import FAST, fast_digest, is_sealed, seal

__all__ = ["CACHE_VERSION", "cache_schema", "plan_shards", "prepare_study", "save_dataset", "write_shard",
           "shard_arrow_intact"]

CACHE_VERSION = 2  # bump when the pixel pipeline changes: invalidates every shard fingerprint (2: image_sizes)


def plan_shards(frame, size: int, shard_studies: int) -> tuple[list[dict[str, Any]], list[tuple[int, int]], list[str],
                                                                 str]:
    """(JSON-able records, shard row bounds, shard fingerprints, overall fingerprint) of a manifest at ``size``."""
    records = [jsonable(r) for r in frame.to_dict(orient="records")]
    study_fps = [study_fingerprint(r, size) for r in records]
    bounds = [(s, min(s + shard_studies, len(records))) for s in range(0, len(records), max(1, shard_studies))]
    shard_fps = [combine(study_fps[a:b]) for a, b in bounds]
    return records, bounds, shard_fps, combine(shard_fps)


def cache_schema(frame):
    """Arrow schema of the cache rows: the manifest columns plus ``pixels`` and ``image_sizes`` (each kept view's
    original [height, width]: a resized square no longer shows that its original was a few pixels wide)."""
    import pyarrow as pa

    return pa.Schema.from_pandas(frame.drop(columns=["image_sizes"], errors="ignore"), preserve_index=False) \
        .remove_metadata().append(pa.field("pixels", pa.list_(pa.binary()))) \
        .append(pa.field("image_sizes", pa.list_(pa.list_(pa.int32()))))


def study_fingerprint(record: dict[str, Any], size: int) -> str:
    stats = []
    for path in record["image_paths"]:
        try:
            st = os.stat(path)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    payload = json.dumps([CACHE_VERSION, size, record, stats], sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


def combine(fingerprints: list[str]) -> str:
    return hashlib.sha1("".join(fingerprints).encode()).hexdigest()


def jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, float) and math.isnan(value):
            value = None
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out



def prepare_study(task: tuple[int, list[str], str, int]) -> tuple[int, list[bytes], list[int], str,
                                                                   list[tuple[str, str]]]:
    """Read, resize and pad one study's images. Returns (row, pixels, kept image indices, boxes JSON, failures,
    original [height, width] of each kept image)."""
    from rvl.data.io import ImageReadError, box_to_square, read_image, to_square_uint8

    row, paths, boxes_json, size = task
    try:
        boxes = json.loads(boxes_json) if boxes_json else []
    except json.JSONDecodeError:
        boxes = []
    pixels, kept, new_boxes, failures, sizes = [], [], [], [], []
    for i, path in enumerate(paths):
        try:
            image = read_image(path)
        except ImageReadError as e:
            failures.append((path, e.cause))
            continue
        except Exception as e:  # a decoder bug must not kill a 300k-image run; it is reported like any failure
            failures.append((path, f"{type(e).__name__}: {e}"))
            continue
        height, width = image.shape
        pixels.append(to_square_uint8(image, size).tobytes())
        kept.append(i)
        sizes.append([int(height), int(width)])
        image_boxes = boxes[i] if i < len(boxes) and isinstance(boxes[i], list) else []
        new_boxes.append([{**b, "box": box_to_square(b["box"], height, width, size)}
                          if isinstance(b, dict) and b.get("box") is not None else b for b in image_boxes])
    return row, pixels, kept, json.dumps(new_boxes), failures, sizes




def write_shard(shard_dir: Path, fingerprint: str, rows, results: dict[int, tuple], schema) -> None:
    """Write one finished shard (Arrow stream file, the format ``datasets`` memory-maps) and its skip list."""
    import pyarrow as pa

    rows = rows.copy()
    order = list(rows.index)
    rows["pixels"] = [results[r][0] for r in order]
    rows["image_sizes"] = [results[r][4] for r in order]
    keep_images = [results[r][1] for r in order]
    rows["image_paths"] = [[paths[i] for i in kept] for paths, kept in zip(rows["image_paths"], keep_images)]
    rows["view_positions"] = [[views[i] for i in kept] for views, kept in zip(rows["view_positions"], keep_images)]
    rows["finding_boxes"] = [results[r][2] for r in order]
    skipped = [{"path": path, "study_id": str(sid), "reason": reason}
               for r, sid in zip(order, rows["study_id"]) for path, reason in results[r][3]]
    n_dropped = int(sum(1 for kept in keep_images if not kept))
    rows = rows[[len(kept) > 0 for kept in keep_images]]
    table = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
    tmp = shard_dir / f".{fingerprint}.arrow.tmp-{os.getpid()}"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    dropped_rows = [int(r) for r, kept in zip(order, keep_images) if not kept]
    write_text_atomic(shard_dir / f"{fingerprint}.skipped.json",
                      json.dumps(seal({"skipped": skipped, "dropped_studies": n_dropped, "dropped_rows": dropped_rows,
                                       "arrow": {"size": tmp.stat().st_size, FAST: fast_digest(tmp)}})))
    os.replace(tmp, shard_dir / f"{fingerprint}.arrow")  # last: the .arrow file marks the shard as complete


def shard_arrow_intact(shard_dir: Path, fingerprint: str) -> bool:
    """Whether a finished shard's ``.arrow`` file still matches the checksum recorded when it was written."""
    arrow, record = shard_dir / f"{fingerprint}.arrow", shard_dir / f"{fingerprint}.skipped.json"
    try:
        entry = json.loads(record.read_text())
        if not is_sealed(entry):
            return False  # the skip list itself was altered
        expected = entry["arrow"]
        return arrow.stat().st_size == expected["size"] and fast_digest(arrow) == expected[FAST]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def save_dataset(data, out_dir: Path, fingerprint: str, num_shards: int | None = None,
                 max_shard_size: int | str | None = None) -> tuple[list[str], list[int]]:
    """Write ``data`` as ``out_dir/dataset`` (hidden temporary folder, then an atomic swap).

    ``state.json`` gets the cache's content fingerprint instead of the one ``datasets`` derives from file paths, so
    the same studies always give the same bytes (a resumed or repaired cache is bit-identical to a fresh one).

    Returns:
        The data files (relative to ``out_dir``) in row order and the rows in each.
    """
    import shutil

    import datasets

    tmp = out_dir / f".dataset.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        data.save_to_disk(str(tmp), num_shards=num_shards, max_shard_size=None if num_shards else max_shard_size)
        state = json.loads((tmp / "state.json").read_text())
        state.update(_fingerprint=fingerprint[:16], _format_columns=None, _format_kwargs={}, _format_type=None,
                     _output_all_columns=False)  # the plain format, however the rows were concatenated
        write_text_atomic(tmp / "state.json", json.dumps(state, indent=2, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) leaves no half folder behind
        raise
    replace_dir(tmp, out_dir / "dataset")
    files = [f"dataset/{f['filename']}" for f in state["_data_files"]]
    return files, [datasets.Dataset.from_file(str(out_dir / f)).num_rows for f in files]
