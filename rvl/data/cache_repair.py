"""``rvl prepare --repair``: rebuild only the files of a prepared cache that no longer match their checksums.

The rows of each data file of ``DIR/dataset`` are known from ``prepare.json`` (rows per file, and the manifest rows
dropped because none of their images could be read), so only the prepare shards overlapping a damaged or missing file
are read from their images again; the intact files are reused as they are, and the dataset is written again with the
same number of files. The rebuild is deterministic: the repaired files match the checksums recorded when the cache was
first written (a mismatch is reported and the new checksums recorded).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rvl.fileio import exclusive_output, write_text_atomic
from rvl.integrity import check_files, check_seal, file_table

from rvl.data.cache_files import read_prepare_info
from rvl.data.cache_shards import cache_schema, plan_shards, prepare_study, save_dataset, write_shard

__all__ = ["repair_cache"]

logger = logging.getLogger(__name__)


def repair_cache(manifest: Any, out_dir: str | os.PathLike, error: type[Exception], format: str = "auto",
                 progress: bool = True, **reader_kwargs: Any) -> dict[str, Any]:
    """Rebuild the damaged data files of a cache from the same manifest (see the module docstring).

    Args:
        manifest: the manifest the cache was prepared from (its fingerprint must still match).
        out_dir: the cache folder.
        error: exception type raised for a cache that cannot be repaired (``PrepareError``).
        format, reader_kwargs: as for ``rvl prepare``.

    Returns:
        ``prepare.json``'s content with ``repaired`` (the rebuilt files) and ``seconds``.
    """
    with exclusive_output(Path(out_dir) / ".prepare.lock", f"the cache {out_dir}"):
        return _repair(manifest, Path(out_dir), error, format, progress, reader_kwargs)


def _repair(manifest: Any, out_dir: Path, error: type[Exception], format: str, progress: bool,
            reader_kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`repair_cache` under the cache's output lock."""
    import datasets
    from tqdm.auto import tqdm

    from rvl.data.labels import MEMO_NAME, fill_labels
    from rvl.data.manifest import read_manifest

    start = time.perf_counter()
    info = read_prepare_info(out_dir)
    full = f"delete {out_dir} and run `rvl prepare` again without --repair"
    if "checksums" not in info or "data_file_rows" not in info or "dropped_rows" not in info:
        raise error(f"{out_dir / 'prepare.json'}: cache written before checksums were recorded; {full}")
    table = check_seal(info["checksums"], out_dir / "prepare.json", full)
    bad = sorted(s.path for s in check_files(out_dir, table, extras=False) if s.status != "ok")
    if not bad:
        return {**info, "repaired": [], "differ": [], "seconds": round(time.perf_counter() - start, 2)}
    if "skipped.csv" in bad:
        raise error(f"{out_dir / 'skipped.csv'} is damaged and lists failures that cannot be re-derived alone; {full}")
    frame = read_manifest(manifest, format=format, **reader_kwargs)
    # the labels the cache was prepared with (rvl.nlp fills studies without labels): the same rows, the same shards
    frame, _ = fill_labels(frame, info.get("labels", {}).get("mode", "keep"), memo=out_dir / MEMO_NAME)
    size = int(info["size"])
    records, bounds, shard_fps, fingerprint = plan_shards(frame, size, int(info.get("shard_studies", 256)))
    if fingerprint != info["fingerprint"]:
        raise error(f"{manifest}: the manifest or its images changed since {out_dir} was prepared; run "
                    f"`rvl prepare` without --repair to rebuild what changed")
    data_files = sorted(f for f in table["files"] if f.startswith("dataset/data-"))
    dropped = set(info["dropped_rows"])
    # rows of prepare shard j in the concatenated table: [starts[j], starts[j + 1])
    starts = [sum(1 for r in range(a) if r not in dropped) for a, _ in bounds] + [len(records) - len(dropped)]
    schema, parts, work, built = cache_schema(frame), [], out_dir / f".repair.tmp-{os.getpid()}", {}
    work.mkdir(exist_ok=True)
    bar = tqdm(total=len(bounds), unit="shard", desc="repair", disable=not progress, dynamic_ncols=True)

    def shard(j: int):
        """Prepare shard ``j`` built again exactly as ``rvl prepare`` built it (same rows, same record batches)."""
        if j not in built:
            rows = range(*bounds[j])
            results = {row: prepare_study((row, records[row]["image_paths"], records[row]["finding_boxes"],
                                           size))[1:] for row in rows}
            write_shard(work, shard_fps[j], frame.iloc[bounds[j][0]:bounds[j][1]], results, schema)
            built[j] = datasets.Dataset.from_file(str(work / f"{shard_fps[j]}.arrow"))
            bar.update(1)
        return built[j]

    try:
        first = 0
        for rel, n_rows in zip(data_files, info["data_file_rows"]):
            a, b, first = first, first + n_rows, first + n_rows
            if rel not in bad:
                parts.append(datasets.Dataset.from_file(str(out_dir / rel)))
                continue
            # the writer's bytes depend on the record batches it slices, so the damaged rows are cut from whole
            # rebuilt prepare shards, as in the first run
            for j in range(len(bounds)):
                lo, hi = max(a, starts[j]), min(b, starts[j + 1])
                if lo < hi:
                    parts.append(shard(j).select(range(lo - starts[j], hi - starts[j])))
        data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        files, _ = save_dataset(data, out_dir, fingerprint, num_shards=len(data_files))
        del data, parts, built
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    rebuilt = file_table(out_dir, [*files, "dataset/state.json", "dataset/dataset_info.json", "skipped.csv"])
    differ = [f for f in rebuilt["files"] if rebuilt["files"][f] != table["files"].get(f)]
    if differ:  # cannot happen with unchanged sources; recorded so that the cache stays self-consistent
        logger.warning("repaired files differ from the checksums recorded at first write: %s", ", ".join(differ))
    info["checksums"] = rebuilt
    write_text_atomic(out_dir / "prepare.json", json.dumps(info, indent=2))
    return {**info, "repaired": bad, "differ": differ, "seconds": round(time.perf_counter() - start, 2)}
