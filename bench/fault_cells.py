"""Cells of ``bench/fault_matrix.py``: artifact comparison, corruption of every file of every artifact kind, a full
disk, and the cost of checking a cache's checksums."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rvl.faults import corrupt, file_size_limit, small_tmpfs
from rvl.integrity import read_checksums
from rvl.verify import verify_path

FAULTS = ("flip", "truncate", "delete")


# -------------------------------------------------------------------------------------------------- comparisons
def same_cache(a: Path, b: Path) -> tuple[bool, str]:
    """Bit-identical cache data (every checksummed file) and ``rvl verify`` clean."""
    import json

    ta = json.loads((a / "prepare.json").read_text())["checksums"]["files"]
    tb = json.loads((b / "prepare.json").read_text())["checksums"]["files"]
    problems = [s for _, statuses in verify_path(b) for s in statuses if s.status != "ok"]
    return ta == tb and not problems, f"{len(ta)} files {'identical' if ta == tb else 'DIFFER'}" + \
        (f", verify: {problems[:2]}" if problems else "")


def same_files(a: Path, b: Path, names: list[str]) -> tuple[bool, str]:
    differ = [n for n in names if not (b / n).is_file() or (a / n).read_bytes() != (b / n).read_bytes()]
    return not differ, f"{len(names) - len(differ)}/{len(names)} files bit-identical" + \
        (f" (differ: {differ})" if differ else "")


def same_weights(a: Path, b: Path) -> tuple[bool, str]:
    """Every tensor of the two exported models equal: max |dw| = 0."""
    from safetensors.torch import load_file

    if not (b / "open_clip_model.safetensors").is_file():
        return False, "no exported model"
    worst, n = 0.0, 0
    for name in ("open_clip_model.safetensors", "rvl/rvl_heads.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        if wa.keys() != wb.keys():
            return False, f"{name}: different tensors"
        for key in wa:
            worst = max(worst, float((wa[key].double() - wb[key].double()).abs().max()) if wa[key].numel() else 0.0)
            n += 1
    return worst == 0.0, f"{n} tensors, max |dw| = {worst:.3g}"


# -------------------------------------------------------------------------------------------------- readers
def _read_cache(copy: Path, ref: Path) -> str:
    from rvl.data import StudyDataset

    got, want = StudyDataset(copy, train=False), StudyDataset(ref, train=False)
    same = len(got) == len(want) and all(np.array_equal(got[i]["images"].numpy(), want[i]["images"].numpy())
                                         for i in range(len(got)))
    return "intact" if same else "used altered data"


def _read_shards(copy: Path, ref: Path) -> str:
    from rvl.data import prepare

    info = __import__("json").loads((ref / "prepare.json").read_text())
    shutil.rmtree(copy / "dataset")
    (copy / "prepare.json").unlink()
    prepare(info["source_manifest"], copy, size=info["size"], workers=0, progress=False, keep_shards=True,
            shard_studies=info["shard_studies"])
    same, _ = same_cache(ref, copy)
    return "intact" if same else "used altered data"


def _read_checkpoint(copy: Path, ref: Path) -> str:
    from rvl.train_support import verify_checkpoint

    verify_checkpoint(copy, copy.parent)
    return "intact" if same_files(ref, copy, sorted(read_checksums(ref)["files"]))[0] else "used altered data"


def _read_model(copy: Path, ref: Path) -> str:
    import torch

    from rvl.model import from_pretrained

    got, want = from_pretrained(copy).state_dict(), from_pretrained(ref).state_dict()
    return "intact" if all(torch.equal(got[k], want[k]) for k in want) else "used altered data"


def _read_index(copy: Path, ref: Path) -> str:
    from rvl.retrieval import EmbeddingIndex

    got, want = EmbeddingIndex.load(copy), EmbeddingIndex.load(ref)
    same = np.array_equal(got.reconstruct(got.ids), want.reconstruct(want.ids)) and got.metadata.equals(want.metadata)
    return "intact" if same else "used altered data"


def _read_labels(copy: Path, ref: Path) -> str:
    from rvl.integrity import check_sidecar

    check_sidecar(copy / "labels.csv")
    return "intact" if same_files(ref, copy, ["labels.csv"])[0] else "used altered data"


ARTIFACT_READERS: dict[str, Callable[[Path, Path], str]] = {
    "cache": _read_cache, "cache shards": _read_shards, "checkpoint": _read_checkpoint, "model": _read_model,
    "index": _read_index, "label output": _read_labels}


def _artifact_files(kind: str, root: Path) -> list[str]:
    if kind == "cache":
        import json

        return ["prepare.json", *json.loads((root / "prepare.json").read_text())["checksums"]["files"]]
    if kind == "cache shards":
        return sorted(str(p.relative_to(root)) for p in (root / "shards").iterdir())[:4]  # two shards: .arrow+.json
    if kind == "label output":
        return ["labels.csv", "labels.csv.sha256"]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def corrupt_cells(refs: dict[str, Path], paths: dict[str, Path], work: Path, matrix: Any) -> None:
    """Each file of each artifact kind x flip / truncate / delete: the reader refuses naming it (or works on intact
    data), and ``rvl verify`` names it."""
    from rvl.data import prepare

    shards_ref = work / "shards-ref"
    prepare(paths["manifest"], shards_ref, size=64, workers=0, progress=False, keep_shards=True, shard_studies=4)
    roots = {"cache": refs["prepare"] / "cache", "cache shards": shards_ref,
             "checkpoint": sorted((refs["pretrain"] / "run" / "checkpoints").glob("step_*"))[-1],
             "model": refs["pretrain"] / "run" / "model", "index": refs["index build"] / "idx",
             "label output": refs["label"]}
    for kind, root in roots.items():
        for rel in _artifact_files(kind, root):
            for fault in FAULTS:
                copy = work / kind.replace(" ", "_") / f"{rel.replace('/', '_')}-{fault}" / root.name
                shutil.rmtree(copy.parent, ignore_errors=True)
                shutil.copytree(root, copy)
                corrupt(copy / rel, fault, seed=len(rel))
                named = _verify_names(copy if kind != "label output" else copy / "labels.csv", rel)
                try:
                    result = ARTIFACT_READERS[kind](copy, root)
                    refused = ""
                except Exception as err:  # noqa: BLE001 - any refusal counts if it names the file
                    result, refused = "refused", f"{type(err).__name__}: {err}"
                shard_kind = kind == "cache shards"
                names_it = Path(rel).name in refused or (shard_kind and Path(rel).name.split(".")[0] in refused)
                good = (result == "intact" or (result == "refused" and names_it)) and named
                verdict = "survived" if good else ("silent" if result == "used altered data" else "lost")
                detail = f"reader: {result if not refused else refused[:110]}; verify {'named' if named else 'MISSED'}"
                matrix.add(f"artifact: {kind}", f"{fault}:{rel}", verdict, detail)


def _verify_names(path: Path, rel: str) -> bool:
    stem = Path(rel).name.split(".")[0]
    for _, statuses in verify_path(path):
        for status in statuses:
            if status.status != "ok" and (Path(status.path).name == Path(rel).name or stem in status.path):
                return True
    return False


# -------------------------------------------------------------------------------------------------- disk full
def _du(path: Path) -> int:
    """Bytes a copy of ``path`` takes on tmpfs (whole 4 KiB pages per file)."""
    return sum(max(4096, -(-p.stat().st_size // 4096) * 4096) for p in path.rglob("*") if p.is_file())


def disk_full_cell(spec: Any, ref_out: Path, paths: dict[str, Path], work: Path, matrix: Any, env: dict) -> None:
    """The previous version of the artifact on a tmpfs with room for half a new version; the command must fail with
    a clear message and leave the previous version intact (RLIMIT_FSIZE where no tmpfs can be mounted)."""
    mount = work / spec.name.replace(" ", "_")
    shutil.rmtree(mount, ignore_errors=True)
    size, largest = _du(ref_out), max(p.stat().st_size for p in ref_out.rglob("*") if p.is_file())
    argv = spec.argv(mount)
    if spec.name == "prepare":
        argv[argv.index("--size") + 1] = "96"  # a new version with bigger images
    if spec.name == "pretrain":
        argv = [*spec.rerun(mount), "--max-steps", "12"]  # new checkpoints after the previous ones
    try:
        with small_tmpfs(mount, size_kb=(size + largest // 2) // 1024) as where:  # half a new largest file
            shutil.copytree(ref_out, where, dirs_exist_ok=True)
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
            how = "tmpfs"
            same, detail = spec.same(ref_out, where)
    except OSError:
        shutil.copytree(ref_out, mount, dirs_exist_ok=True)
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900,
                              preexec_fn=file_size_limit(largest // 2))
        how = "RLIMIT_FSIZE"
        same, detail = spec.same(ref_out, mount)
    clear = done.returncode == 2 and "out of disk space" in done.stderr and "Traceback" not in done.stderr
    verdict = "survived" if clear and same else ("traceback" if "Traceback" in done.stderr else "lost")
    matrix.add(spec.name, "disk full", verdict, f"{how}: exit {done.returncode}, "
               f"{done.stderr.strip().splitlines()[-1][-110:] if done.stderr.strip() else ''}; previous: {detail}")


# -------------------------------------------------------------------------------------------------- checksum cost
def checksum_cost(work: Path, gigabytes: float) -> str:
    """Open a synthetic ~``gigabytes`` cache with and without the checksum check, and read every study once."""
    import json

    import datasets
    import pandas as pd
    import pyarrow as pa

    from rvl import integrity
    from rvl.data import StudyDataset
    from rvl.data.cache_files import load_cache
    from rvl.data.cache_shards import cache_schema, save_dataset
    from rvl.data.schema import finalize_manifest

    size, views = 256, 2
    n = max(64, int(gigabytes * 1e9 / (size * size * views)))
    work.mkdir(parents=True, exist_ok=True)
    frame = finalize_manifest(pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)],
                                            "study_id": [f"s{i}" for i in range(n)],
                                            "image_paths": [[f"/x/{i}a.png", f"/x/{i}b.png"] for i in range(n)],
                                            "view_positions": [["PA", "LATERAL"]] * n, "report": ["FINDINGS: x."] * n}),
                              base_dir=work, origin="synthetic")
    schema, rng, stream = cache_schema(frame), np.random.default_rng(0), work / "synthetic.arrow"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, n, 256):
            part = frame.iloc[start:start + 256].copy()
            part["pixels"] = [[rng.integers(0, 256, size * size, dtype=np.uint8).tobytes() for _ in range(views)]
                              for _ in range(len(part))]
            writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False), max_chunksize=64)
    files, rows = save_dataset(datasets.Dataset.from_file(str(stream)), work, "synthetic")
    stream.unlink()
    info = {"size": size, "checksums": integrity.file_table(work, [*files, "dataset/state.json",
                                                                   "dataset/dataset_info.json"]),
            "source_manifest": "synthetic", "data_file_rows": rows}
    (work / "prepare.json").write_text(json.dumps(info))
    (work / "skipped.csv").write_text("path,study_id,reason\n")
    gb = sum((work / f).stat().st_size for f in files) / 1e9
    subprocess.run(["cat", *map(str, work.rglob("*.arrow"))], stdout=subprocess.DEVNULL)  # warm the page cache

    t0 = time.perf_counter()
    load_cache(work, verify=False)
    t_open = time.perf_counter() - t0
    integrity._verified.clear()
    t0 = time.perf_counter()
    load_cache(work, verify=True)
    t_open_checked = time.perf_counter() - t0
    t0 = time.perf_counter()
    statuses = integrity.check_files(work, info["checksums"], extras=False)
    t_verify = time.perf_counter() - t0
    assert all(st.status == "ok" for st in statuses)
    dataset = StudyDataset(work, train=False)
    t0 = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    t_read = time.perf_counter() - t0
    check = t_open_checked - t_open
    lines = [f"checksum cost on a {gb:.2f} GB cache ({n} studies x {views} views of {size} px, warm page cache):",
             f"  open without the check  {t_open:8.2f} s",
             f"  open with the check     {t_open_checked:8.2f} s   (xxh3_128 of every file: +{check:.2f} s, "
             f"{gb / max(check, 1e-9):.2f} GB/s)",
             f"  rvl verify (sha256)     {t_verify:8.2f} s   ({gb / max(t_verify, 1e-9):.2f} GB/s; "
             f"{100 * t_verify / max(t_read, 1e-9):.0f} % of a read, had readers used sha256)",
             f"  read every study once   {t_read:8.2f} s   (StudyDataset items, default transform)",
             f"  check / read            {100 * check / t_read:8.1f} %   (target <= 5 %; once per process, not per "
             "epoch)"]
    shutil.rmtree(work, ignore_errors=True)
    return "\n".join(lines)
