"""The demo's evaluation report: a self-contained HTML page (figures embedded as base64 PNGs) and a printed summary.

Everything here works on plain numpy arrays and dicts produced by ``rvl.demo``; matplotlib is imported lazily (Agg
backend) so that ``rvl --help`` stays fast.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# (metrics.json key, display name, comparison, threshold, description) — the targets, checked honestly.
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("runtime_s", "whole demo run time", "<=", 600.0, "≤ 10 minutes on 2 CPU cores"),
    ("zeroshot.macro_auc_on_reports", "prompts on the test reports", ">=", 0.92,
     "≥ 0.92 macro AUC: the text side is no longer the ceiling"),
    ("zeroshot.macro_auc", "prompt zero-shot macro AUC", ">=", 0.85, "≥ 0.85 over the findings the phantoms draw"),
    ("knn.macro_auc", "kNN zero-shot macro AUC", ">=", 0.85, "≥ 0.85"),
    ("retrieval.study_to_report.R@5", "study→report R@5", ">=", 0.35, "≥ 0.35"),
    ("pointing_game", "heatmap pointing game", ">=", 0.5, "≥ 0.5"),
    ("multiview.gain_auc", "multi-view gain on lateral-visible findings", ">=", 0.05,
     "multi-view minus frontal-only AUC ≥ 0.05"),
]


@dataclass
class RetrievalExample:
    """A query study with its top retrieved studies (thumbnails of the frontal view, reports, similarity scores)."""

    query_image: np.ndarray
    query_report: str
    query_id: str
    hits: list[dict[str, Any]] = field(default_factory=list)  # {"image", "report", "study_id", "score", "same_patient"}


def lookup(metrics: dict[str, Any], dotted: str) -> Any:
    """``lookup(m, "retrieval.study_to_report.R@5")`` walks nested dicts; missing keys give None."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            # keys may themselves contain dots (e.g. "R@5" never does, but be lenient with flattened dicts)
            return None
        node = node[part]
    return node


def check_targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare metrics with the targets; each row says plainly whether the target was met."""
    rows = []
    for key, name, op, threshold, description in TARGETS:
        value = lookup(metrics, key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met = None
        else:
            met = bool(value <= threshold) if op == "<=" else bool(value >= threshold)
        rows.append({"key": key, "name": name, "value": value, "threshold": threshold, "op": op,
                     "description": description, "met": met})
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def summary_table(metrics: dict[str, Any]) -> str:
    """The plain-text summary printed at the end of the demo."""
    lines = ["", "rvl demo — held-out phantom patients", "=" * 78]
    zs, knn = metrics.get("zeroshot", {}), metrics.get("knn", {})
    per_label = zs.get("per_label", {})
    knn_label = knn.get("per_label", {})
    if per_label:
        lines.append(f"{'finding':<28}{'prompt AUC':>11}{'95% CI':>17}{'kNN AUC':>10}{'n+':>6}{'n-':>6}")
        for label, row in per_label.items():
            k = knn_label.get(label, {})
            lines.append(f"{label:<28}{_fmt(row.get('auc')):>11}"
                         f"{'[' + _fmt(row.get('ci_low')) + ', ' + _fmt(row.get('ci_high')) + ']':>17}"
                         f"{_fmt(k.get('auc')):>10}{_fmt(row.get('n_pos', '')):>6}{_fmt(row.get('n_neg', '')):>6}")
        lines.append("-" * 78)
    lines.append(f"{'macro AUC: prompt zero-shot':<40}{_fmt(zs.get('macro_auc'))}")
    lines.append(f"{'macro AUC: kNN zero-shot':<40}{_fmt(knn.get('macro_auc'))}")
    lines.append(f"{'macro AUC: prompts on the test reports':<40}{_fmt(zs.get('macro_auc_on_reports'))}"
                 "  (text-side ceiling)")
    for direction in ("study_to_report", "report_to_study"):
        r = metrics.get("retrieval", {}).get(direction, {})
        lines.append(f"{direction.replace('_', ' '):<40}" + "  ".join(f"{k}={_fmt(r.get(k))}" for k in
                                                                  ("R@1", "R@5", "R@10")))
    lines.append(f"{'pointing game':<40}{_fmt(metrics.get('pointing_game'))}")
    mv = metrics.get("multiview", {})
    lines.append(f"{'lateral-visible: multi-view vs frontal':<40}{_fmt(mv.get('multiview_auc'))} vs "
                 f"{_fmt(mv.get('frontal_auc'))}  gain {_fmt(mv.get('gain_auc'))}")
    lab = metrics.get("labeler", {})
    lines.append(f"{'labeler agreement with ground truth':<40}{_fmt(lab.get('agreement'))}")
    settings = metrics.get("settings", {})
    recipe = {"pretrained": "pretrained text tower (all-MiniLM-L6-v2, locked)", "scratch": "text tower from scratch "
              "(rvl[pretrained] not installed)"}.get(settings.get("recipe"), settings.get("recipe", "custom"))
    training = metrics.get("training", {})
    lines.append(f"{'recipe':<40}{recipe}, {_fmt(training.get('steps'))} steps x {_fmt(training.get('batch_size'))}")
    lines.append(f"{'run time':<40}{_fmt(metrics.get('runtime_s'), 0)} s")
    lines.append("=" * 78)
    for row in check_targets(metrics):
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[row["met"]]
        lines.append(f"target {row['name']:<46} {_fmt(row['value'])} ({row['description']}): {verdict}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def roc_figure(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], title: str) -> bytes:
    """ROC curves: ``curves[label][method] = (y_true, scores)``; one panel per label, one line per method."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    labels = list(curves)
    ncols = min(4, max(1, len(labels)))
    nrows = max(1, math.ceil(len(labels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        for method, (y, s) in curves[label].items():
            y, s = np.asarray(y), np.asarray(s)
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1.5, label=f"{method} {roc_auc_score(y, s):.2f}")
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("1 − specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=11)
    return figure_png(fig)


def thumbnail_png(image: np.ndarray, size: int = 160) -> bytes:
    from PIL import Image

    pil = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    pil.thumbnail((size, size))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;
 padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.25em .6em;
 text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.met{color:#1a7f37;font-weight:600}.notmet{color:#c62828;font-weight:600}.na{color:#888}
img.fig{max-width:100%;border:1px solid #eee}img.thumb{width:160px;border:1px solid #eee}
.report{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.8em;background:#fafafa;
 border:1px solid #eee;padding:.5em;max-height:14em;overflow:auto}
.hits{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:1em}.small{font-size:.85em;color:#555}
"""


def _img_tag(png: bytes, alt: str, cls: str = "fig") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if str(c).startswith('<') else html.escape(_fmt(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html_report(path: str | Path, metrics: dict[str, Any], figures: dict[str, bytes],
                      retrieval_example: RetrievalExample | None = None, notes: Sequence[str] = ()) -> Path:
    """Write the self-contained report (no external files: every image is an embedded base64 PNG)."""
    path = Path(path)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>rvl demo report</title>",
             f"<style>{_CSS}</style></head><body>", "<h1>rvl demo: report-supervised multi-view pretraining on "
             "chest-radiograph phantoms</h1>"]
    settings = metrics.get("settings", {})
    shown = {k: v for k, v in settings.items() if isinstance(v, (int, float, str))}
    training = metrics.get("training", {})
    parts.append(f"<p class='small'>{html.escape(', '.join(f'{k}={v}' for k, v in shown.items()))}; "
                 f"{_fmt(training.get('steps'))} training steps of {_fmt(training.get('batch_size'))} studies per "
                 f"model.<br>"
                 f"run time {_fmt(metrics.get('runtime_s'), 0)} s; evaluated on held-out patients (test split, "
                 f"{_fmt(lookup(metrics, 'data.n_test_studies'))} studies of "
                 f"{_fmt(lookup(metrics, 'data.n_test_patients'))} patients never seen in training).</p>")

    parts.append("<h2>Targets</h2>")
    rows = []
    for row in check_targets(metrics):
        verdicts = {True: ("met", "met"), False: ("notmet", "target not met"), None: ("na", "not measured")}
        cls, word = verdicts[row["met"]]
        rows.append([row["name"], row["value"], f"{row['op']} {row['threshold']}",
                     f"<span class='{cls}'>{word}</span>"])
    parts.append(_table(["target", "value", "goal", "verdict"], rows))
    missed = [r for r in check_targets(metrics) if r["met"] is False]
    if missed:
        parts.append("<p class='notmet'>Not every target was reached in this run: "
                     + html.escape("; ".join(f"{r['name']} is {_fmt(r['value'])} (goal {r['op']} {r['threshold']})"
                                             for r in missed)) + ".</p>")
    for note in notes:
        parts.append(f"<p>{html.escape(note)}</p>")

    parts.append("<h2>Zero-shot classification (AUC with 95% bootstrap CI)</h2>")
    zs, knn = metrics.get("zeroshot", {}), metrics.get("knn", {})
    rows = []
    for label, row in zs.get("per_label", {}).items():
        k = knn.get("per_label", {}).get(label, {})
        rows.append([label, row.get("auc"), f"[{_fmt(row.get('ci_low'))}, {_fmt(row.get('ci_high'))}]", k.get("auc"),
                     f"[{_fmt(k.get('ci_low'))}, {_fmt(k.get('ci_high'))}]", row.get("n_pos"), row.get("n_neg")])
    rows.append(["macro", zs.get("macro_auc"), "", knn.get("macro_auc"), "", "", ""])
    parts.append(_table(["finding", "prompt AUC", "95% CI", "kNN AUC", "95% CI", "positives", "negatives"], rows))
    parts.append(f"<p>The same prompts applied to the test studies' own report embeddings reach a macro AUC of "
                 f"<b>{_fmt(zs.get('macro_auc_on_reports'))}</b>: how well the text tower reads the prompts, a ceiling "
                 f"for prompt zero-shot on the images.</p>")
    parts.append("<h3>ROC curves (held-out test patients)</h3>")
    for key, caption in (("multiview:roc_prompt", "prompt zero-shot"), ("multiview:roc_knn", "kNN zero-shot")):
        if key in figures:
            parts.append(f"<figure style='display:inline-block;margin:0 1em 1em 0;width:46%'>"
                         f"{_img_tag(figures[key], caption)}<figcaption class='small'>{caption}</figcaption></figure>")

    parts.append("<h2>Retrieval</h2>")
    ret = metrics.get("retrieval", {})
    parts.append(_table(["direction", "R@1", "R@5", "R@10"],
                        [[d.replace("_", " → ").replace(" → to → ", " → "), *(ret.get(d, {}).get(k) for k in
                                                                          ("R@1", "R@5", "R@10"))]
                         for d in ("study_to_report", "report_to_study")]))
    if retrieval_example is not None:
        ex = retrieval_example
        parts.append(f"<h3>Similar studies in the archive for the held-out query {html.escape(ex.query_id)}</h3>"
                     "<p class='small'>Study→study search in the study index (fused multi-view embeddings), other "
                     "patients only; the reports are shown for reading, they played no part in the search.</p>"
                     "<div class='hits'><div>"
                     f"<b>query</b><br>{_img_tag(thumbnail_png(ex.query_image), 'query', 'thumb')}"
                     f"<div class='report'>{html.escape(ex.query_report)}</div></div>")
        for rank, hit in enumerate(ex.hits, 1):
            same = " (same patient)" if hit.get("same_patient") else ""
            parts.append(f"<div><b>#{rank}</b> {html.escape(str(hit['study_id']))}{same}, similarity "
                         f"{_fmt(hit.get('score'))}<br>{_img_tag(thumbnail_png(hit['image']), 'hit', 'thumb')}"
                         f"<div class='report'>{html.escape(hit['report'])}</div></div>")
        parts.append("</div>")

    parts.append("<h2>Grounding: where does the prompt match?</h2>")
    parts.append(f"<p>Pointing game (the heatmap's peak falls inside a ground-truth box): "
                 f"<b>{_fmt(metrics.get('pointing_game'))}</b> over "
                 f"{_fmt(lookup(metrics, 'pointing_game_n'))} image–finding pairs.</p>")
    if figures.get("heatmaps"):
        parts.append("<p class='small'>Prompt (the finding and its side) vs patch embeddings; green: the ground-truth "
                     "box; +: the heatmap's peak.</p><div class='hits'>")
        parts += [f"<div>{_img_tag(png, 'heatmap')}</div>" for png in figures["heatmaps"]]
        parts.append("</div>")

    mv = metrics.get("multiview", {})
    parts.append("<h2>Multi-view vs frontal-only (same training budget)</h2>")
    parts.append("<p>AUC on findings the phantoms draw visible mainly on the lateral view (positives: studies whose "
                 "finding is lateral-only; negatives: studies without the finding).</p>")
    rows = [[label, r.get("multiview_auc"), r.get("frontal_auc"), r.get("n_pos")]
            for label, r in mv.get("per_label", {}).items()]
    rows.append(["mean", mv.get("multiview_auc"), mv.get("frontal_auc"), ""])
    parts.append(_table(["finding", "multi-view AUC", "frontal-only AUC", "positives"], rows))
    parts.append(f"<p>Gain: <b>{_fmt(mv.get('gain_auc'))}</b>. Overall prompt zero-shot macro AUC of the frontal-only "
                 f"model: {_fmt(mv.get('frontal_macro_auc'))}.</p>")
    if mv.get("note"):
        parts.append(f"<p class='notmet'>{html.escape(mv['note'])}</p>")
    if "roc_lateral" in figures:
        parts.append(_img_tag(figures["roc_lateral"], "ROC lateral-visible"))

    lab = metrics.get("labeler", {})
    parts.append("<h2>Report labeler vs phantom ground truth</h2>")
    parts.append(f"<p>Agreement on mentioned labels (1 / 0 / −1 exact match where the ground truth is not blank): "
                 f"<b>{_fmt(lab.get('agreement'))}</b>; mention agreement (blank vs not) {_fmt(lab.get('mention'))}."
                 "</p>")
    parts.append(_table(["label", "agreement", "mentions"],
                        [[k, v.get("agreement"), v.get("n")] for k, v in lab.get("per_label", {}).items()]))
    if "training" in figures:
        parts.append("<h2>Training</h2>" + _img_tag(figures["training"], "training"))
    parts.append("<h2>Stage timings</h2>")
    parts.append(_table(["stage", "seconds"], [[k, v] for k, v in metrics.get("stage_seconds", {}).items()]))
    parts.append("</body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
