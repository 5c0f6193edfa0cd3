"""Scoring and reporting of ``rvl finetune`` runs: per-study predictions, AUCs with CIs, the summary files, the plot.

Targets on the held-out split are scored as ``rvl evaluate`` scores them (1 positive; 0 or blank negative; -1
uncertain left out of that label), whatever the training policy was, so every run is judged on the same truth.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rvl.evaluate import eval_targets
from rvl.fileio import write_text_atomic

__all__ = ["score_run", "write_predictions", "collect_results", "write_summary"]

SUMMARY_COLUMNS = ["init", "mode", "augment", "settings", "fraction", "seed", "macro_auc", "macro_ci_low",
                   "macro_ci_high", "n_patients", "n_studies", "subset_hash", "loss", "pos_weight", "uncertain",
                   "blank", "views", "steps", "pointing_game", "run"]


def score_run(probs: np.ndarray, frame: Any, labels: Sequence[str], n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """``rvl.metrics.bootstrap_auc`` of the scores ``(N, L)`` against the test frame's labels."""
    from rvl.metrics import bootstrap_auc

    return bootstrap_auc(probs, eval_targets(frame, labels), n_bootstrap=n_bootstrap, seed=seed, labels=list(labels))


def write_predictions(path: Path, probs: np.ndarray, frame: Any, labels: Sequence[str]) -> None:
    """Per-study CSV: ids, the score of each label and the target it is scored against (blank = excluded)."""
    import pandas as pd

    targets = eval_targets(frame, labels)
    table = pd.DataFrame({"study_id": frame["study_id"].astype(str).to_numpy(),
                          "patient_id": frame["patient_id"].astype(str).to_numpy()})
    for j, label in enumerate(labels):
        table[f"score:{label}"] = np.round(probs[:, j], 6)
        table[f"target:{label}"] = targets[:, j]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, table.to_csv(index=False))


def collect_results(runs_dir: Path) -> list[dict[str, Any]]:
    """Every finished run's ``result.json`` under ``runs_dir`` (a run without one is unfinished)."""
    from rvl.finetune.outputs import read_result

    return [read_result(p) for p in sorted(Path(runs_dir).glob("*/result.json"))]


def _row(result: dict[str, Any]) -> dict[str, Any]:
    macro = result["metrics"]["macro"]
    pointing = (result.get("cam") or {}).get("pointing_game", {}).get("accuracy")
    settings = result["settings"]
    return {"init": result["init"], "mode": result["mode"], "augment": result["augment"],
            "settings": result["run"].rsplit("__", 1)[-1], "fraction": result["fraction"], "seed": result["seed"],
            "macro_auc": macro["auc"],
            "macro_ci_low": macro["ci_low"], "macro_ci_high": macro["ci_high"], "n_patients": result["n_patients"],
            "n_studies": result["n_studies"], "subset_hash": result["subset_hash"], "loss": settings["loss"],
            "pos_weight": settings["pos_weight"], "uncertain": settings["uncertain"], "blank": settings["blank"],
            "views": settings["views"], "steps": result["train"]["steps"], "pointing_game": pointing,
            "run": result["run"], **{f"auc:{k}": v["auc"] for k, v in result["metrics"]["per_label"].items()}}


def _mean_sd(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f} (n={len(values)})"


def summary_table(rows: list[dict[str, Any]]) -> str:
    """REFERS-style markdown: one row per (init, mode, augmentation, settings hash), one column per label fraction,
    mean ± sd of the macro AUC over seeds. The hash (the end of the run folder names) keeps runs with other settings
    (loss, steps, ...) written into the same folder apart."""
    fractions = sorted({r["fraction"] for r in rows})
    groups: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["mode"], r["augment"], r["settings"]), {}).setdefault(r["fraction"], []).append(
            r["macro_auc"])
    header = "| init | mode | augmentation | settings | " + " | ".join(f"{f * 100:g} % labels" for f in fractions) \
        + " |"
    lines = [header, "|" + "---|" * (4 + len(fractions))]
    for (init, mode, augment, settings), by_fraction in sorted(groups.items()):
        cells = [_mean_sd(by_fraction.get(f, [])) if f in by_fraction else "" for f in fractions]
        lines.append(f"| {init} | {mode} | {augment} | {settings} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rvl.metrics import save_figure

    groups: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r["macro_auc"] is None:
            continue
        name = f"{r['init']} · {r['mode']}" + (f" · {r['augment']}" if r["augment"] != "none" else "") + \
            f" · {r['settings']}"
        groups.setdefault(name, {}).setdefault(r["fraction"], []).append(r["macro_auc"])
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, by_fraction in sorted(groups.items()):
        xs = sorted(by_fraction)
        means = [float(np.mean(by_fraction[x])) for x in xs]
        sds = [float(np.std(by_fraction[x], ddof=1)) if len(by_fraction[x]) > 1 else 0.0 for x in xs]
        ax.errorbar([x * 100 for x in xs], means, yerr=sds, marker="o", capsize=3, label=name)
    ax.set(xscale="log", xlabel="labelled training patients (%)", ylabel="macro AUC (test, mean ± sd over seeds)",
           title="fine-tuning: AUC vs label fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out)


def write_summary(out_dir: Path) -> dict[str, Any]:
    """``summary.csv`` (a row per finished run), ``summary.md`` (the table) and ``auc_vs_fraction.png``."""
    import pandas as pd

    rows = [_row(r) for r in collect_results(out_dir / "runs")]
    if not rows:
        return {"runs": 0}
    table = pd.DataFrame(rows)
    extra = [c for c in table.columns if c not in SUMMARY_COLUMNS]
    table = table[SUMMARY_COLUMNS + extra].sort_values(["init", "mode", "augment", "settings", "fraction", "seed"])
    write_text_atomic(out_dir / "summary.csv", table.to_csv(index=False))
    markdown = summary_table(rows)
    hashes = sorted({(r["fraction"], r["seed"], r["subset_hash"]) for r in rows})
    text = ("# rvl finetune: macro AUC on the held-out test patients (mean ± sd over seeds)\n\n" + markdown +
            "\n\nPatient subsets (`subsets/patients_<fraction>_seed<k>.txt`), SHA-256/16 of each list:\n\n" +
            "\n".join(f"- {f:g} seed {s}: `{h}`" for f, s, h in hashes) + "\n")
    write_text_atomic(out_dir / "summary.md", text)
    plot = _plot(rows, out_dir / "auc_vs_fraction.png")
    return {"runs": len(rows), "table": markdown, "plot": str(plot) if plot else None}
