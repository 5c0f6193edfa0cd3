"""Which text-tower recipe the demo trains: the same cache, seed and steps for each, then ``rvl evaluate --split test``.

Recipes (overlays on ``rvl/configs/demo-scratch.yaml``):

* ``scratch``  the from-scratch BERT text tower (the fallback recipe);
* ``full``     all-MiniLM-L6-v2 fine-tuned whole, at its own lr (``--pretrained-lr 2e-5``);
* ``partial``  MiniLM locked except its last 2 layers (``--pretrained-lr 1e-4``);
* ``locked``   MiniLM locked, pooled features computed once per report (``--cache-text-features``): the demo recipe;
* ``locked-mlp`` / ``locked-labelhead``  the locked recipe with an MLP projection / with the label head on;
* ``locked-mlp-sentences``  locked-mlp where 30 % of the training texts are one sentence of the report
  (``data.sentence_sampling``, labelled per sentence by ``rvl.nlp``);
* ``locked-mlp-bag``  locked-mlp with ``text_pooling: sentences``: a text is the mean of its projected sentences.

Usage (needs rvl[pretrained]; the cache of a demo run, e.g. ``rvl demo --output D --max-steps 1`` then ``D/cache``)::

    python bench/bench_demo_recipes.py --cache D/cache --steps 150 --work /tmp/recipes [--recipes scratch locked]

Each recipe trains in its own process with one thread (they run side by side); quality figures come from the fixed
step count, wall times from this machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MINILM = {"text_tower": "sentence-transformers/all-MiniLM-L6-v2", "caption_vocab": "train"}
RECIPES = {
    "scratch": {},
    "full": {"model": MINILM, "optim": {"pretrained_lr": 2.0e-5}},
    "partial": {"model": {**MINILM, "lock_text": True, "lock_text_unlocked_layers": 2},
                "optim": {"pretrained_lr": 1.0e-4}},
    "locked": {"model": {**MINILM, "lock_text": True, "cache_text_features": True}},
    "locked-mlp": {"model": {**MINILM, "lock_text": True, "cache_text_features": True, "name": "MLP"}},
    "locked-labelhead": {"model": {**MINILM, "lock_text": True, "cache_text_features": True},
                         "objectives": {"label_head_weight": 0.5}},
    "locked-mlp-sentences": {"model": {**MINILM, "lock_text": True, "cache_text_features": True, "name": "MLP"},
                             "data": {"sentence_sampling": 0.3}},
    "locked-mlp-bag": {"model": {**MINILM, "lock_text": True, "cache_text_features": True, "name": "MLP",
                                 "text_pooling": "sentences"}},
}


def write_recipe(name: str, work: Path) -> Path:
    config = yaml.safe_load((ROOT / "rvl" / "configs" / "demo-scratch.yaml").read_text())
    for section, values in copy.deepcopy(RECIPES[name]).items():
        if values.get("name") == "MLP":  # rvl-demo with an MLP text projection instead of a linear one
            model_cfg = json.loads((ROOT / "rvl" / "model" / "configs" / "rvl-demo.json").read_text())
            model_cfg["text_cfg"]["hf_proj_type"] = "mlp"
            (work / "rvl-demo-mlp.json").write_text(json.dumps(model_cfg))
            values["name"] = str(work / "rvl-demo-mlp.json")
        config[section].update(values)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def macro(per_label: dict) -> float:
    values = [row["auc"] for row in per_label.values() if row.get("auc") is not None]
    return float(np.mean(values)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="prepared demo cache (rvl demo's DIR/cache)")
    parser.add_argument("--work", default="/tmp/rvl-recipes")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", nargs="+", default=["scratch", "full", "partial", "locked"], choices=RECIPES)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    rvl = [sys.executable, "-m", "rvl"]
    procs, started = {}, {}
    for name in args.recipes:
        out = work / name
        if not (out / "model").is_dir():
            cmd = rvl + ["pretrain", "--config", str(write_recipe(name, work)), "--data", args.cache, "--output-dir",
                         str(out), "--max-steps", str(args.steps), "--seed", str(args.seed), "--save-every",
                         str(args.steps), "--eval-every", str(args.steps), "--cpu"]
            procs[name] = subprocess.Popen(cmd, env=env, stdout=open(work / f"{name}.train.log", "w"),
                                           stderr=subprocess.STDOUT)
            started[name] = time.time()
    seconds = {}
    for name, proc in procs.items():
        if proc.wait() != 0:
            print(f"{name}: training failed, see {work / (name + '.train.log')}", file=sys.stderr)
            return 1
        seconds[name] = time.time() - started[name]
    rows = []
    for name in args.recipes:
        out = work / name
        if not (out / "eval" / "metrics.json").is_file():
            subprocess.run(rvl + ["evaluate", "--model", str(out / "model"), "--data", args.cache, "--split", "test",
                                  "--bootstrap", "200", "--out", str(out / "eval"), "--device", "cpu"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        m = json.loads((out / "eval" / "metrics.json").read_text())
        s2r = m["retrieval"]["study_to_report"]
        rows.append((name, macro(m["zeroshot_prompt_on_reports"]["per_label"]), macro(m["zeroshot_prompt"]["per_label"]),
                     macro(m["zeroshot_knn"]["per_label"]), s2r["R@5"], m["pointing_game"]["accuracy"],
                     seconds.get(name)))
    print(f"\n{args.steps} steps x batch 32, seed {args.seed}, cache {args.cache}; macro AUC over the 14 labels of the test "
          "split (rvl evaluate, 200 bootstrap resamples)\n")
    print("| recipe | prompts on test reports | prompt zero-shot | kNN zero-shot | study→report R@5 | pointing game | "
          "train s (this run) |")
    print("|---|---|---|---|---|---|---|")
    for name, reports, prompt, knn, r5, pointing, secs in rows:
        print(f"| {name} | {reports:.3f} | {prompt:.3f} | {knn:.3f} | {r5:.3f} | {pointing:.3f} | "
              f"{'' if secs is None else f'{secs:.0f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
