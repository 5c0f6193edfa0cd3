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


def same_finetune(a: Path, b: Path) -> tuple[bool, str]:
    """The reference's predictions and summary table, the same final fine-tuned weights, and ``rvl verify`` clean
    (``b`` may hold more runs: a new version that added runs before the disk filled)."""
    names = [f"predictions/{p.name}" for p in sorted((a / "predictions").glob("*.csv"))] + ["summary.csv"]
    ok, detail = same_files(a, b, names)
    ckpts = sorted(p.relative_to(a).as_posix() for p in a.glob("runs/*/checkpoints/step_*/model.safetensors"))
    weights_ok, weights = same_files(a, b, ckpts)
    problems = [s for _, statuses in verify_path(b) for s in statuses if s.status != "ok"]
    return ok and weights_ok and bool(ckpts) and not problems, \
        f"{detail}; weights: {weights}" + (f"; verify: {problems[:2]}" if problems else "")


def _demo_view(metrics: Any) -> Any:
    """metrics.json without what depends on the clock (timings, throughput, reused stages)."""
    if isinstance(metrics, dict):
        return {k: _demo_view(v) for k, v in metrics.items()
                if not any(t in k for t in ("seconds", "runtime", "per_s", "reused"))}
    return [_demo_view(v) for v in metrics] if isinstance(metrics, list) else metrics


def _relative(path: str, *roots: Path) -> str:
    """``path`` relative to the first of ``roots`` it lies under (a copied demo folder still reads the reference's
    phantoms, whose absolute paths its records hold)."""
    for root in roots:
        if Path(path).is_relative_to(root):
            return str(Path(path).relative_to(root))
    return path


def _same_cache_rows(a: Path, b: Path, root_a: Path, root_b: Path) -> tuple[bool, str]:
    """Every row and pixel of two caches equal, image paths compared relative to their demo folders (each demo run
    writes its phantoms into its own folder), and ``rvl verify`` clean."""
    from rvl.data.cache_files import load_cache

    problems = [s for _, statuses in verify_path(b) for s in statuses if s.status != "ok"]
    try:
        fa, fb = load_cache(a)[0].to_pandas(), load_cache(b)[0].to_pandas()
    except Exception as err:  # noqa: BLE001 - an unreadable cache is a difference
        return False, f"unreadable: {err}"
    for frame in (fa, fb):
        frame["image_paths"] = [[_relative(p, root_a, root_b) for p in paths] for paths in frame["image_paths"]]
    same = fa.columns.equals(fb.columns) and all(fa[c].astype(str).equals(fb[c].astype(str)) for c in fa.columns)
    return same and not problems, f"{len(fa)} rows {'identical' if same else 'DIFFER'}" + \
        (f", verify: {problems[:2]}" if problems else "")


def _same_index(a: Path, b: Path, root_a: Path, root_b: Path) -> tuple[bool, str]:
    """The same vectors (index.faiss bit-identical) and metadata, image paths relative to the demo folders."""
    import json

    import pandas as pd

    same_vectors, detail = same_files(a, b, ["index.faiss"])
    try:
        ma, mb = pd.read_parquet(a / "metadata.parquet"), pd.read_parquet(b / "metadata.parquet")
    except (OSError, ValueError) as err:
        return False, f"unreadable metadata: {err}"
    for frame in (ma, mb):
        frame["image_paths"] = [json.dumps([_relative(p, root_a, root_b) for p in json.loads(v)])
                                for v in frame["image_paths"]]
    same_meta = ma.equals(mb)
    return same_vectors and same_meta, f"{detail}; metadata {'identical' if same_meta else 'DIFFERS'}"


def same_demo(a: Path, b: Path) -> tuple[bool, str]:
    """Every stage's artifacts equal: caches, both models' weights, both indexes, the metrics (timings aside)."""
    import json

    checks = {"cache": _same_cache_rows(a / "cache", b / "cache", a, b),
              "frontal cache": _same_cache_rows(a / "cache_frontal", b / "cache_frontal", a, b),
              "multi-view model": same_weights(a / "train_multiview" / "model", b / "train_multiview" / "model"),
              "frontal model": same_weights(a / "train_frontal" / "model", b / "train_frontal" / "model"),
              **{f"{kind} index": _same_index(a / f"index_{kind}", b / f"index_{kind}", a, b)
                 for kind in ("study", "report")}}
    try:
        same_metrics = _demo_view(json.loads((a / "metrics.json").read_text())) == \
            _demo_view(json.loads((b / "metrics.json").read_text()))
    except (OSError, ValueError):
        same_metrics = False
    bad = [k for k, (ok, _) in checks.items() if not ok] + ([] if same_metrics else ["metrics"])
    return not bad, "caches, models, indexes and metrics identical" if not bad else \
        "DIFFER: " + "; ".join(f"{k}: {checks[k][1]}" if k in checks else k for k in bad)


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
    if kind == "finetune output":  # its own files (its checkpoints are the "checkpoint" kind)
        from rvl.finetune.outputs import table_files

        return ["checksums.json", *table_files(root)]
    if kind == "demo":  # its own files: stage records, manifests, metrics, report (the rest are other kinds)
        stages = sorted(f"stages/{p.name}" for p in (root / "stages").glob("*.stage.json"))
        return [*stages, "labelled/manifest.parquet", "labelled_frontal/manifest.parquet", "metrics.json",
                "report.html"]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def command_reader(spec: Any, env: dict) -> Callable[[Path, Path], str]:
    """A reader that is the command itself run again on the damaged copy (``rvl finetune --resume``, ``rvl demo``):
    exit 2 is a refusal (its message must name the file), exit 0 must give the reference's artifacts."""
    def read(copy: Path, ref: Path) -> str:
        done = subprocess.run(spec.rerun(copy.parent), env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(f"exit {done.returncode}: " + ("Traceback " if "Traceback" in done.stderr else "") +
                               (lines[-1] if lines else ""))
        return "intact" if spec.same(ref.parent, copy.parent)[0] else "used altered data"
    return read


def corrupt_cells(refs: dict[str, Path], paths: dict[str, Path], work: Path, matrix: Any,
                  commands: dict[str, Any] | None = None, env: dict | None = None) -> None:
    """Each file of each artifact kind x flip / truncate / delete: the reader refuses naming it (or works on intact
    data), and ``rvl verify`` names it. ``commands`` (name -> KillSpec) adds the outputs of ``rvl finetune`` and
    ``rvl demo``, read by running the command again."""
    from rvl.data import prepare

    shards_ref = work / "shards-ref"
    prepare(paths["manifest"], shards_ref, size=64, workers=0, progress=False, keep_shards=True, shard_studies=4)
    roots = {"cache": refs["prepare"] / "cache", "cache shards": shards_ref,
             "checkpoint": sorted((refs["pretrain"] / "run" / "checkpoints").glob("step_*"))[-1],
             "model": refs["pretrain"] / "run" / "model", "index": refs["index build"] / "idx",
             "label output": refs["label"]}
    readers = dict(ARTIFACT_READERS)
    for name, folder, kind in (("finetune", "FT", "finetune output"), ("demo", "demo", "demo")):
        if commands and name in commands and name in refs:
            roots[kind] = refs[name] / folder
            readers[kind] = command_reader(commands[name], env or {})
    for kind, root in roots.items():
        for rel in _artifact_files(kind, root):
            for fault in FAULTS:
                copy = work / kind.replace(" ", "_") / f"{rel.replace('/', '_')}-{fault}" / root.name
                shutil.rmtree(copy.parent, ignore_errors=True)
                shutil.copytree(root, copy)
                corrupt(copy / rel, fault, seed=len(rel))
                named = _verify_names(copy if kind != "label output" else copy / "labels.csv", rel)
                try:
                    result = readers[kind](copy, root)
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
    argv = spec.again(mount) if spec.again else spec.argv(mount)  # a new version of the artifact
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
    lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or [""]
    matrix.add(spec.name, "disk full", verdict,
               f"{how}: exit {done.returncode}, {lines[-1][-110:]}; previous: {detail}")


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
            part["image_sizes"] = [[[size, size]] * views for _ in range(len(part))]
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
