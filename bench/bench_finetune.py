"""Transfer benchmark of ``rvl finetune`` on phantoms, REFERS-style: pretrain on one phantom set, fine-tune on another.

1. Phantom set A (``--seed 0``): reports labelled by ``rvl.nlp`` (as the demo does), prepared, and ``rvl pretrain``
   with the from-scratch demo recipe (``rvl/configs/demo-scratch.yaml``) for a fixed number of steps.
2. Phantom set B (``--seed 1``, other patients): its labels are the downstream labels; ``rvl finetune`` runs
   rvl-pretrained vs scratch (same rvl-demo architecture), linear and full, 1 / 10 / 100 % of the training patients,
   3 seeds; then full fine-tuning of the pretrained encoder at 10 % with CutMix and with Cut&Remain.
3. Prints the table and the targets: at 1 % the pretrained linear probe beats scratch full fine-tuning by >= 0.10
   macro AUC; at 100 % pretrained full fine-tuning >= scratch.

Every stage is skipped when its output exists (the fine-tuning grid resumes), so an interrupted run continues.
Quality figures come from fixed step counts. Run: ``python bench/bench_finetune.py --work /tmp/rvl-bench-ft``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

LABELS = ["No Finding", "Cardiomegaly", "Lung Lesion", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion",
          "Fracture", "Support Devices"]  # the findings with >= 6 positive test studies in phantom set B
ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], log: Path | None = None) -> None:
    print("$ " + " ".join(f"'{c}'" if " " in c else c for c in cmd), flush=True)
    started = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True)
    else:
        with open(log, "ab") as sink:
            proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f"failed (exit {proc.returncode}); see {log}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/rvl-bench-finetune")
    parser.add_argument("--studies-pretrain", type=int, default=1200)
    parser.add_argument("--studies-finetune", type=int, default=1500)
    parser.add_argument("--size", type=int, default=128, help="phantom and cache size (rvl-demo's input size)")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rvl = [sys.executable, "-m", "rvl"]
    env_threads = os.environ.get("OMP_NUM_THREADS", "?")
    started = time.perf_counter()
    # ---- 1. pretraining set A, labelled by rvl.nlp like the demo, prepared at the model's input size
    if not (work / "cacheA" / "prepare.json").is_file():
        sh(rvl + ["phantoms", "--out", str(work / "phA"), "--studies", str(args.studies_pretrain), "--size",
                  str(args.size), "--seed", "0", "--workers", "2", "--no-progress"])
        from rvl.demo.stages import stage_label

        labelled = stage_label(work / "A", {"manifest": str(work / "phA" / "manifest.parquet")})
        sh(rvl + ["prepare", labelled["manifest"], "--out", str(work / "cacheA"), "--size", str(args.size),
                  "--no-progress"])
    pretrained = work / "pretrain" / "model"
    if not (pretrained / "open_clip_config.json").is_file():
        (work / "pretrain").mkdir(exist_ok=True)
        sh(rvl + ["pretrain", "--config", str(ROOT / "rvl" / "configs" / "demo-scratch.yaml"), "--data", str(work / "cacheA"),
                  "--output-dir", str(work / "pretrain"), "--max-steps", str(args.pretrain_steps), "--seed", "0",
                  "--save-every", str(args.pretrain_steps), "--eval-every", str(args.pretrain_steps), "--cpu",
                  "--resume"], log=work / "pretrain" / "train.log")
    # ---- 2. fine-tuning set B: other patients, ground-truth labels as the downstream labels
    if not (work / "cacheB" / "prepare.json").is_file():
        sh(rvl + ["phantoms", "--out", str(work / "phB"), "--studies", str(args.studies_finetune), "--size",
                  str(args.size), "--seed", "1", "--workers", "2", "--no-progress"])
        sh(rvl + ["prepare", str(work / "phB" / "manifest.parquet"), "--out", str(work / "cacheB"), "--size",
                  str(args.size), "--no-progress"])
    ft = work / "finetune"
    common = ["finetune", "--data", str(work / "cacheB"), "--labels", *LABELS, "--output-dir", str(ft), "--views",
              "frontal", "--max-steps", str(args.finetune_steps), "--batch-size", "32", "--seeds", *args.seeds,
              "--cam", "4", "--resume"]
    log = work / "finetune.log"
    sh(rvl + common + ["--init", str(pretrained), "scratch", "--mode", "linear", "full", "--label-fraction", "0.01",
                       "0.1", "1.0"], log=log)
    for extra in (["--cutmix", "1.0"], ["--cut-remain", "0.5"]):
        sh(rvl + common + ["--init", str(pretrained), "--mode", "full", "--label-fraction", "0.1", *extra], log=log)
    report(ft, pretrained, time.perf_counter() - started, env_threads, args)
    return 0


def report(ft: Path, pretrained: Path, seconds: float, threads: str, args: argparse.Namespace) -> None:
    import pandas as pd

    table = pd.read_csv(ft / "summary.csv")
    table["init"] = table["init"].where(table["init"] == "scratch", "rvl-pretrained")
    print("\n" + (ft / "summary.md").read_text().replace(str(pretrained), "rvl-pretrained"))

    def mean(init: str, mode: str, fraction: float, augment: str = "none") -> pd.Series:
        rows = table[(table["init"] == init) & (table["mode"] == mode) & (table["fraction"] == fraction)
                     & (table["augment"] == augment)]
        return rows["macro_auc"]

    lines = ["| comparison | A (mean ± sd) | B (mean ± sd) | A − B | target | met |", "|---|---|---|---|---|---|"]

    def row(name: str, a: pd.Series, b: pd.Series, margin: float | None) -> None:
        diff = a.mean() - b.mean()
        target = f"A − B ≥ {margin:.2f}" if margin is not None else "(measured)"
        met = "yes" if margin is not None and diff >= margin else ("no" if margin is not None else "")
        lines.append(f"| {name} | {a.mean():.3f} ± {a.std(ddof=1):.3f} | {b.mean():.3f} ± {b.std(ddof=1):.3f} | "
                     f"{diff:+.3f} | {target} | {met} |")

    row("1 %: pretrained linear (A) vs scratch full (B)", mean("rvl-pretrained", "linear", 0.01),
        mean("scratch", "full", 0.01), 0.10)
    row("100 %: pretrained full (A) vs scratch full (B)", mean("rvl-pretrained", "full", 1.0),
        mean("scratch", "full", 1.0), 0.0)
    for augment in sorted(set(table["augment"]) - {"none"}):
        row(f"10 %: pretrained full {augment} (A) vs no augmentation (B)",
            mean("rvl-pretrained", "full", 0.1, augment), mean("rvl-pretrained", "full", 0.1), None)
    print("\n".join(lines))
    augmented = table[(table["fraction"] == 0.1) & (table["mode"] == "full") & (table["init"] == "rvl-pretrained")]
    print("\n10 % pretrained full fine-tuning per seed (macro AUC [95 % bootstrap CI over test studies]):")
    for _, r in augmented.sort_values(["augment", "seed"]).iterrows():
        print(f"  {r['augment']:<14} seed {r['seed']}: {r['macro_auc']:.3f} [{r['macro_ci_low']:.3f}, "
              f"{r['macro_ci_high']:.3f}]  CAM pointing game {r['pointing_game']:.3f}")
    print(f"\n{len(table)} runs; this invocation {seconds / 60:.1f} min (finished stages and runs are skipped) on "
          f"{os.cpu_count()} CPU cores (OMP_NUM_THREADS={threads}); pretrain {args.pretrain_steps} steps, fine-tune "
          f"{args.finetune_steps} steps x batch 32, linear probe 300 full-batch steps")


if __name__ == "__main__":
    raise SystemExit(main())
