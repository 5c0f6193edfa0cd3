"""Fault matrix: every long rvl command and every artifact kind under kills, corruption, a full disk, two writers and a
corpus of bad inputs; plus the cost of checking a ~1 GB cache's checksums.

Cells (each prints survived / lost / silent / traceback):

- kill: SIGKILL at seeded random moments (every third one the moment a temporary file of a write appears), then the
  same command again (``--resume`` for pretrain): the artifacts must equal an uninterrupted run's, bit for bit
  (cache data files, label output, index files; every weight tensor for training), with no temporary file left.
- corrupt: flip bytes in, truncate and delete each file of each artifact kind: its reader must refuse naming the file
  (or, for a file the reader does not need, keep working with intact data) and ``rvl verify`` must name it.
- disk full: the output on a small tmpfs (root) or with RLIMIT_FSIZE: exit 2 with a clear message, no traceback, and
  the previous version of the artifact still verifies and equals what it was.
- two writers: a second writer started while the first holds the output: refused (or waits), output equal to the
  reference.
- bad inputs: the full corpus of rvl.bad_inputs through every reader / CLI entry.

    .venv/bin/python bench/fault_matrix.py [--quick] [--kills 15] [--cache-gb 1.0] [--work DIR]

``--commands`` picks rows (default every command: prepare, label, pretrain, index build, finetune, demo); the
references of the commands a chosen one reads (prepare and pretrain for finetune and index build) always run.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"})
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_cells import (checksum_cost, corrupt_cells, disk_full_cell, same_cache, same_demo, same_finetune,  # noqa: E402
                         same_files, same_weights)

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
RVL = [sys.executable, "-m", "rvl"]
GOOD = ("survived",)


@dataclass
class KillSpec:
    """A long command: its first and rerun argv for an output folder, and how to compare with the reference."""

    name: str
    argv: Callable[[Path], list[str]]
    rerun: Callable[[Path], list[str]]
    same: Callable[[Path, Path], tuple[bool, str]]
    again: Callable[[Path], list[str]] | None = None  # a new version over a finished one (disk-full cell)
    lock: Callable[[Path], Path] | None = None  # the output lock (two-writers cell)


class Matrix:
    def __init__(self):
        self.cells: list[tuple[str, str, str, str]] = []

    def add(self, row: str, fault: str, verdict: str, detail: str = "") -> None:
        detail = " | ".join(line.strip() for line in detail.splitlines() if line.strip())
        self.cells.append((row, fault, verdict, detail))
        mark = "ok " if verdict in GOOD else "!! "
        print(f"  {mark}{row:<22} {fault:<28} {verdict:<10} {detail[:150]}", flush=True)

    @staticmethod
    def column(fault: str) -> str:
        kind = fault.split(":")[0]
        return "bad input" if kind in ("image", "manifest", "reports") else kind

    def table(self) -> str:
        """survived/cells per command or artifact and fault, then the totals by verdict."""
        order = ["kill", "flip", "truncate", "delete", "disk full", "two writers", "bad input"]
        faults = [f for f in order if any(self.column(c[1]) == f for c in self.cells)]
        rows = sorted({c[0] for c in self.cells}, key=lambda r: (r.startswith("bad"), r.startswith("artifact"), r))
        lines = [f"{'survived / cells':<26}" + "".join(f"{f:>12}" for f in faults)]
        for row in rows:
            cells = []
            for fault in faults:
                mine = [c for c in self.cells if c[0] == row and self.column(c[1]) == fault]
                cells.append(f"{sum(c[2] in GOOD for c in mine)}/{len(mine)}" if mine else "-")
            lines.append(f"{row:<26}" + "".join(f"{c:>12}" for c in cells))
        verdicts = {v: 0 for v in ("survived", "lost", "silent", "traceback")}
        for c in self.cells:
            verdicts[c[2]] = verdicts.get(c[2], 0) + 1
        kills = sum(self.column(c[1]) == "kill" and "finished before" not in c[3] for c in self.cells)
        corrupt = [c for c in self.cells if c[0].startswith("artifact: ")]
        bad = {c[1] for c in self.cells if self.column(c[1]) == "bad input"}
        lines.append(f"totals: {len(self.cells)} cells: " + ", ".join(f"{n} {v}" for v, n in verdicts.items()))
        kinds = len({c[0] for c in corrupt})
        lines.append(f"  {kills} kills that landed (a run may finish first); {len(corrupt)} corruptions of {kinds} "
                     f"artifact kinds x 3 faults; {len(bad)} bad inputs through "
                     f"{sum(self.column(c[1]) == 'bad input' for c in self.cells)} reader / command runs")
        return "\n".join(lines)


def run(argv: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout, **kwargs)


def leftovers(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------------------------------------------------ setup
def setup(work: Path, n_studies: int) -> dict[str, Path]:
    """Phantoms, a reports CSV, and the uninterrupted reference runs of every command."""
    import pandas as pd

    from rvl.phantoms import generate_phantoms

    paths = {"phantoms": generate_phantoms(work / "phantoms", n_studies, size=64, seed=0, progress=False)}
    paths["manifest"] = work / "phantoms" / "manifest.parquet"
    reports = pd.read_parquet(paths["manifest"])["report"]
    pd.DataFrame({"report": list(reports) * 40}).to_csv(work / "reports.csv", index=False)
    paths["reports"] = work / "reports.csv"
    return paths


def commands(paths: dict[str, Path], ref: Path) -> list[KillSpec]:
    prepare = ["prepare", str(paths["manifest"]), "--size", "64", "--shard-studies", "4", "--workers", "1",
               "--no-progress"]
    label = ["label", str(paths["reports"]), "--chunk-size", "100", "--no-progress"]
    pretrain = ["pretrain", "--data", str(ref / "prepare" / "cache"), "--model", "rvl-tiny", "--max-steps", "9",
                "--batch-size", "8", "--save-every", "3", "--seed", "3", "--eval-every", "100", "--log-with", "none",
                "--cpu"]
    index = ["index", "build", "--model", str(ref / "pretrain" / "run" / "model"), "--data",
             str(ref / "prepare" / "cache"), "--device", "cpu"]
    # linear probe + full fine-tuning of the pretrained model, checkpoints every 2 of 8 steps
    finetune = ["finetune", "--data", str(ref / "prepare" / "cache"), "--init", str(ref / "pretrain" / "run" / "model"),
                "--mode", "linear", "full", "--label-fraction", "1.0", "--seeds", "0", "--max-steps", "8",
                "--save-every", "2", "--batch-size", "8", "--linear-steps", "50", "--bootstrap", "20", "--cpu",
                "--labels", "Cardiomegaly", "Pleural Effusion", "Support Devices"]  # positives in train and test
    # the whole demo, small: phantoms, label, prepare, two trainings, indexes, evaluation, report
    demo = ["demo", "--studies", "60", "--max-steps", "4", "--device", "cpu"]

    def with_value(argv: list[str], flag: str, value: str) -> list[str]:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv

    return [
        KillSpec("prepare", lambda o: [*RVL, *prepare, "--out", str(o / "cache")],
                 lambda o: [*RVL, *prepare, "--out", str(o / "cache")],
                 lambda a, b: same_cache(a / "cache", b / "cache"),
                 again=lambda o: [*RVL, *with_value(prepare, "--size", "96"), "--out", str(o / "cache")],
                 lock=lambda o: o / "cache" / ".prepare.lock"),
        KillSpec("label", lambda o: [*RVL, *label, "--output", str(o / "labels.csv")],
                 lambda o: [*RVL, *label, "--output", str(o / "labels.csv")],
                 lambda a, b: same_files(a, b, ["labels.csv", "labels.csv.sha256"]),
                 lock=lambda o: o / ".labels.csv.lock"),
        KillSpec("pretrain", lambda o: [*RVL, *pretrain, "--output-dir", str(o / "run")],
                 lambda o: [*RVL, *pretrain, "--output-dir", str(o / "run"), "--resume"],
                 lambda a, b: same_weights(a / "run" / "model", b / "run" / "model"),
                 again=lambda o: [*RVL, *with_value(pretrain, "--max-steps", "12"), "--output-dir", str(o / "run"),
                                  "--resume"],  # new checkpoints after the previous ones
                 lock=lambda o: o / "run" / ".pretrain.lock"),
        KillSpec("index build", lambda o: [*RVL, *index, "--out", str(o / "idx")],
                 lambda o: [*RVL, *index, "--out", str(o / "idx")],
                 lambda a, b: same_files(a / "idx", b / "idx", ["index.faiss", "metadata.parquet"]),
                 lock=lambda o: o / ".idx.lock"),
        KillSpec("finetune", lambda o: [*RVL, *finetune, "--output-dir", str(o / "FT")],
                 lambda o: [*RVL, *finetune, "--output-dir", str(o / "FT"), "--resume"],
                 lambda a, b: same_finetune(a / "FT", b / "FT"),
                 again=lambda o: [*RVL, *with_value(finetune, "--label-fraction", "0.5"), "--output-dir",
                                  str(o / "FT"), "--resume"],  # two new runs beside the finished ones
                 lock=lambda o: o / "FT" / ".finetune.lock"),
        KillSpec("demo", lambda o: [*RVL, *demo, "--output", str(o / "demo")],
                 lambda o: [*RVL, *demo, "--output", str(o / "demo")],
                 lambda a, b: same_demo(a / "demo", b / "demo"),
                 again=lambda o: [*RVL, *with_value(demo, "--max-steps", "5"), "--output", str(o / "demo")],
                 lock=lambda o: o / "demo" / ".demo.lock"),
    ]


# ------------------------------------------------------------------------------------------------------ kill cells
def kill_cells(spec: KillSpec, ref_out: Path, ref_seconds: float, work: Path, n_kills: int, matrix: Matrix) -> None:
    for k in range(n_kills):
        rng = random.Random(1000 * len(spec.name) + k)
        out = work / f"{spec.name.replace(' ', '_')}-{k}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        inside_write = k % 3 == 2
        delay = rng.uniform(0.05, 0.8) * ref_seconds  # runs vary on a shared machine: stay inside the run
        for _ in range(4):  # a run that finished before its kill is tried again with half the delay
            moment = _run_and_kill(spec.argv(out), out, inside_write, delay)
            if moment:
                break
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            delay /= 2
        moment = moment or "finished before the kill"
        done = run(spec.rerun(out))
        if "Traceback" in done.stderr:
            matrix.add(spec.name, f"kill:{k}", "traceback", done.stderr[-300:])
            continue
        same, detail = spec.same(ref_out, out) if done.returncode == 0 else (False, done.stderr[-300:])
        left = leftovers(out)
        verdict = "survived" if same and not left else "lost"
        matrix.add(spec.name, f"kill:{k}", verdict, f"{moment}; {detail}" + (f"; leftovers {left}" if left else ""))


def _run_and_kill(argv: list[str], out: Path, inside_write: bool, delay: float) -> str:
    """Start ``argv`` and SIGKILL it after ``delay`` s (or, ``inside_write``, once a temporary file appears after a
    third of it); returns the moment, or "" when the command finished first."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, moment = time.perf_counter(), ""
    while proc.poll() is None:
        elapsed = time.perf_counter() - start
        writing = leftovers(out) if inside_write else []  # listed once: the temporary file may vanish any moment
        if writing and elapsed > delay / 3:
            moment = f"inside a write ({writing[0]}) at {elapsed:.2f}s"
        elif not inside_write and elapsed >= delay:
            moment = f"at {elapsed:.2f}s"
        if moment:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.003 if inside_write else 0.01)
    proc.wait()
    return moment


# ------------------------------------------------------------------------------------------------- two writers
def two_writer_cell(spec: KillSpec, ref_out: Path, lock_of: Callable[[Path], Path], work: Path,
                    matrix: Matrix) -> None:
    out = work / f"two-{spec.name.replace(' ', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    first = subprocess.Popen(spec.argv(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not lock_of(out).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    second = run(spec.argv(out))
    first_out, first_err = first.communicate()
    refused = second.returncode == 2 and "being written by another process" in second.stderr
    waited = second.returncode == 0 and first.returncode == 0
    same, detail = spec.same(ref_out, out) if first.returncode == 0 else (False, first_err[-300:])
    verdict = "survived" if same and (refused or waited) else ("traceback" if "Traceback" in second.stderr +
                                                               first_err else "lost")
    how = "second refused" if refused else ("second ran after the first" if waited else
                                            f"second exit {second.returncode}")
    matrix.add(spec.name, "two writers", verdict, f"{how}; {detail}")


# ------------------------------------------------------------------------------------------------------ bad inputs
def bad_input_cells(work: Path, model_dir: Path, matrix: Matrix) -> None:
    from rvl.bad_inputs import build_corpus
    from rvl.bad_inputs_run import ENTRIES, run_case, run_prepare_batch

    cases = build_corpus(work / "corpus", full=True)
    images = [c for c in cases if c.kind == "image"]
    for name, outcome in run_prepare_batch(images, work / "batch").items():
        matrix.add("bad input: prepare", name, _fuzz_verdict(outcome), outcome.message[-120:])
    for case in cases:
        for entry in ENTRIES[case.kind]:
            if entry == "prepare" and case.kind == "image":
                continue  # covered by the batch above
            if entry == "prepare-strict" and case.expect != "error":
                continue
            outcome = run_case(case, entry, work / "runs" / f"{entry}-{case.path.name}", model_dir)
            matrix.add(f"bad input: {entry}", case.name, _fuzz_verdict(outcome), outcome.message[-120:])


def _fuzz_verdict(outcome) -> str:
    return "survived" if outcome.ok else {"traceback": "traceback"}.get(outcome.verdict, "silent")


# -------------------------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 kills per command, a 0.2 GB cache")
    parser.add_argument("--kills", type=int, default=15, help="kill moments per command (default 15: 60 in all)")
    parser.add_argument("--cache-gb", type=float, default=1.0, help="size of the cache for the checksum cost")
    parser.add_argument("--studies", type=int, default=40, help="phantom studies (default 40)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: kill corrupt disk-full two-writers bad-inputs checksum-cost")
    parser.add_argument("--commands", nargs="*", default=None,
                        help="rows of the kill / disk-full / two-writers cells (default all: prepare label pretrain "
                        "'index build' finetune demo)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, deleted)")
    args = parser.parse_args()
    kills, cache_gb = (3, 0.2) if args.quick else (args.kills, args.cache_gb)
    only = set(args.only or ["kill", "corrupt", "disk-full", "two-writers", "bad-inputs", "checksum-cost"])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rvl-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"fault matrix in {work} ({os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    paths = setup(work / "data", args.studies)
    ref = work / "ref"
    specs = commands(paths, ref)
    chosen = set(args.commands or [s.name for s in specs])
    unknown = chosen - {s.name for s in specs}
    if unknown:
        raise SystemExit(f"--commands: unknown {sorted(unknown)}")
    needed = chosen | {"prepare", "pretrain"}  # what the corruption cells and the later commands read
    specs = [s for s in specs if s.name in needed | ({"label", "index build"} if "corrupt" in only else set())]
    seconds = {}
    for spec in specs:  # the reference runs, in order: pretrain reads the cache, index build the model
        (ref / spec.name.split()[0]).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        done = run(spec.argv(ref / spec.name.split()[0]))
        seconds[spec.name] = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"reference {spec.name} failed:\n{done.stderr[-3000:]}")
        print(f"reference {spec.name}: {seconds[spec.name]:.1f} s")
    matrix = Matrix()
    refs = {s.name: ref / s.name.split()[0] for s in specs}
    specs = [s for s in specs if s.name in chosen]
    if "kill" in only:
        for spec in specs:
            kill_cells(spec, refs[spec.name], seconds[spec.name], work / "kill", kills, matrix)
    if "corrupt" in only:
        corrupt_cells(refs, paths, work / "corrupt", matrix, {s.name: s for s in specs}, ENV)
    if "disk-full" in only:
        for spec in specs:
            disk_full_cell(spec, refs[spec.name], paths, work / "full", matrix, ENV)
    if "two-writers" in only:
        for spec in specs:
            two_writer_cell(spec, refs[spec.name], spec.lock, work / "two", matrix)
    if "bad-inputs" in only:
        bad_input_cells(work / "bad", refs["pretrain"] / "run" / "model", matrix)
    print("\n" + matrix.table())
    kinds = sorted({c[0].removeprefix("artifact: ") for c in matrix.cells if c[0].startswith("artifact: ")})
    if kinds:
        print(f"kinds of artifact checked for corruption: {', '.join(kinds)}")
    if "checksum-cost" in only:
        print("\n" + checksum_cost(work / "big", cache_gb))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(c[2] in GOOD for c in matrix.cells) else 1


if __name__ == "__main__":
    raise SystemExit(main())
