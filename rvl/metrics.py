"""Evaluation metrics: per-label AUC with 95 % bootstrap CIs, macro AUC, retrieval recall@K, ROC-curve figures.

The point AUC is sklearn's ``roc_auc_score``; bootstrap replicates use the equivalent rank (Mann-Whitney) formula
vectorised over resamples with ``scipy.stats.rankdata``, so 1,000 resamples of 14 labels take well under a second.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np


def auc_by_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (``(B, N)``) against binary ``targets`` (``(B, N)``), ties averaged; NaN
    where a row has only one class. Equals ``sklearn.metrics.roc_auc_score`` row by row."""
    from scipy.stats import rankdata

    scores, targets = np.atleast_2d(scores), np.atleast_2d(targets).astype(bool)
    ranks = rankdata(scores, axis=1)
    n_pos = targets.sum(axis=1)
    n_neg = targets.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * targets).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def bootstrap_auc(scores: np.ndarray, targets: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                  labels: Sequence[str] | None = None, alpha: float = 0.05) -> dict:
    """Per-label and macro AUC with percentile bootstrap CIs (studies resampled with replacement, seeded).

    Args:
        scores: ``(N, L)`` predicted probabilities.
        targets: ``(N, L)`` with 1 positive, 0 negative, NaN = not evaluated for that label (e.g. uncertain).
        n_bootstrap: Resamples.
        seed: RNG seed (results are reproducible).
        labels: Label names (default ``label_0..``).
        alpha: 0.05 gives 95 % intervals.

    Returns:
        ``{"per_label": {label: {"auc", "ci_low", "ci_high", "n_pos", "n_neg"}}, "macro": {"auc", "ci_low",
        "ci_high", "labels"}}``; AUC is ``None`` for a label with one class only.
    """
    from sklearn.metrics import roc_auc_score

    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, np.float64)
    n, n_labels = scores.shape
    labels = list(labels or [f"label_{j}" for j in range(n_labels)])
    rng = np.random.default_rng(seed)
    resample = rng.integers(0, n, size=(n_bootstrap, n))
    per_label, replicate_aucs = {}, []
    for j, label in enumerate(labels):
        keep = ~np.isnan(targets[:, j])
        y, s = targets[keep, j] > 0.5, scores[keep, j]
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        entry = {"auc": None, "ci_low": None, "ci_high": None, "n_pos": n_pos, "n_neg": n_neg}
        if n_pos and n_neg:
            entry["auc"] = float(roc_auc_score(y, s))
            # the same study resamples for every label (so the macro CI is coherent); within a replicate, this
            # label's unevaluated (NaN-target) studies are left out
            valid = keep[resample]
            reps = _masked_rank_auc(scores[resample, j], targets[resample, j] > 0.5, valid)
            replicate_aucs.append(reps)
            low, high = np.nanpercentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            entry.update(ci_low=float(low), ci_high=float(high))
        else:
            replicate_aucs.append(np.full(n_bootstrap, np.nan))
        per_label[label] = entry
    defined = [j for j, lab in enumerate(labels) if per_label[lab]["auc"] is not None]
    macro = {"auc": None, "ci_low": None, "ci_high": None, "labels": [labels[j] for j in defined]}
    if defined:
        macro["auc"] = float(np.mean([per_label[labels[j]]["auc"] for j in defined]))
        with warnings.catch_warnings():  # replicates where no label has both classes stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            reps = np.nanmean(np.stack([replicate_aucs[j] for j in defined]), axis=0)
        low, high = np.nanpercentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        macro.update(ci_low=float(low), ci_high=float(high))
    return {"per_label": per_label, "macro": macro, "n_bootstrap": n_bootstrap, "seed": seed}


def _masked_rank_auc(scores: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rank AUC per row using only its ``valid`` entries."""
    if valid.all():
        return auc_by_ranks(scores, targets)
    out = np.empty(len(scores))
    for b in range(len(scores)):  # only labels with unevaluated (uncertain) rows take this slower path
        v = valid[b]
        out[b] = auc_by_ranks(scores[b, v][None], targets[b, v][None])[0]
    return out


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall@K: the fraction of queries with a relevant item among their top K.

    Args:
        similarity: ``(Q, N)`` query-by-candidate scores.
        relevant: ``(Q, N)`` boolean, True where the candidate counts as a correct hit (e.g. the paired report, or
            any report with identical text).
    """
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {f"R@{k}": float(np.mean(first < k)) for k in ks}


def save_roc_figure(scores: np.ndarray, targets: np.ndarray, labels: Sequence[str], out: str | os.PathLike,
                    title: str = "ROC") -> Path | None:
    """One ROC curve per label with its AUC in the legend (labels with one class skipped); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 6), dpi=100)
    drawn = 0
    for j, label in enumerate(labels):
        keep = ~np.isnan(targets[:, j])
        y = targets[keep, j] > 0.5
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, scores[keep, j])
        ax.plot(fpr, tpr, lw=1.2, label=f"{label} ({roc_auc_score(y, scores[keep, j]):.2f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, out)


def save_figure(fig, out: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file in the same folder, then rename) and close it."""
    import matplotlib.pyplot as plt

    from rvl.fileio import write_atomic

    fig.tight_layout()
    try:
        return write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
