"""Accuracy of rvl.nlp on the hand-labelled gold sets in bench/nlp_gold/ (see bench/nlp_gold/README.md).

    .venv/bin/python bench/eval_labeler.py [--errors]

Labels: per observation, CheXbert-paper style F1 -- mention (any of 1/0/-1 vs blank), negation (0 vs rest),
uncertain (-1 vs rest) and positive (1 vs rest) -- plus the support-weighted average. Sections: per (report, key)
accuracy over findings/impression/indication/comparison/technique/recommendation (whitespace-normalised exact match)
and per-report exact match of findings+impression.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rvl.constants import CHEXPERT_LABELS

GOLD = Path(__file__).parent / "nlp_gold"
ABBREV = {"NF": "No Finding", "EC": "Enlarged Cardiomediastinum", "CM": "Cardiomegaly", "LO": "Lung Opacity",
          "LL": "Lung Lesion", "ED": "Edema", "CO": "Consolidation", "PN": "Pneumonia", "AT": "Atelectasis",
          "PX": "Pneumothorax", "PE": "Pleural Effusion", "PO": "Pleural Other", "FR": "Fracture",
          "SD": "Support Devices"}
MAJOR = ["Cardiomegaly", "Lung Opacity", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
         "Pleural Effusion", "Support Devices"]
SECTION_KEYS = ["findings", "impression", "indication", "comparison", "technique", "recommendation"]


def f1(gold: list[bool], pred: list[bool]) -> tuple[float, int]:
    tp = sum(g and p for g, p in zip(gold, pred))
    fp = sum(p and not g for g, p in zip(gold, pred))
    fn = sum(g and not p for g, p in zip(gold, pred))
    support = tp + fn
    if tp + fp + fn == 0:
        return math.nan, 0
    return 2 * tp / (2 * tp + fp + fn), support


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate_labels(path: Path, show_errors: bool = False) -> dict:
    from rvl.nlp import label_reports

    gold_rows = load_jsonl(path)
    frame = label_reports([r["report"] for r in gold_rows], return_evidence=show_errors)
    kinds = {"mention": lambda v: not math.isnan(v), "negation": lambda v: v == 0.0,
             "uncertain": lambda v: v == -1.0, "positive": lambda v: v == 1.0}
    results: dict[str, dict[str, tuple[float, int]]] = {}
    for label in CHEXPERT_LABELS:
        gold_values = []
        for r in gold_rows:
            value = {ABBREV[k]: float(v) for k, v in r["labels"].items()}.get(label, math.nan)
            gold_values.append(value)
        pred_values = frame[label].tolist()
        results[label] = {k: f1([fn(g) for g in gold_values], [fn(p) for p in pred_values]) for k, fn in kinds.items()}
        if show_errors:
            for r, g, p, ev in zip(gold_rows, gold_values, pred_values, frame["evidence"]):
                if not (g == p or (math.isnan(g) and math.isnan(p))):
                    print(f"  {r['id']} {label}: gold {g} pred {p}  {json.dumps(ev.get(label, ''))[:300]}")
    return results


def evaluate_sections(show_errors: bool = False) -> tuple[float, float, int]:
    from rvl.nlp import extract_sections

    rows = load_jsonl(GOLD / "sections.jsonl")
    norm = lambda s: " ".join(s.split())  # noqa: E731
    correct = total = exact = 0
    for r in rows:
        pred = extract_sections(r["report"])
        for key in SECTION_KEYS:
            ok = norm(pred.get(key, "")) == norm(r["sections"].get(key, ""))
            correct += ok
            total += 1
            if not ok and show_errors:
                print(f"  {r['id']} {key}: gold {r['sections'].get(key)!r} pred {pred.get(key)!r}")
        exact += all(norm(pred.get(k, "")) == norm(r["sections"].get(k, "")) for k in ("findings", "impression"))
    return correct / total, exact / len(rows), len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--errors", action="store_true", help="print every disagreement with the gold labels")
    parser.add_argument("--gold", nargs="+", default=["labels.jsonl", "labels_heldout.jsonl"],
                        help="label files in bench/nlp_gold/ (default: development set and held-out set)")
    args = parser.parse_args(argv)
    ok = True
    for name in args.gold:
        ok &= report_labels(GOLD / name, args.errors)
    key_acc, exact, n_sections = evaluate_sections(args.errors)
    print(f"\nSections on {n_sections} reports (bench/nlp_gold/sections.jsonl): per-key accuracy {key_acc:.3f}, "
          f"findings+impression exact {exact:.3f}")
    print("all label targets met" if ok else "label targets NOT met")
    return 0


def report_labels(path: Path, show_errors: bool) -> bool:
    results = evaluate_labels(path, show_errors)
    n = len(load_jsonl(path))
    print(f"\nLabel accuracy on {n} hand-labelled reports ({path.name}); F1 (support)")
    print(f"{'observation':28s} {'mention':>13s} {'negation':>13s} {'uncertain':>13s} {'positive':>13s}")
    fmt = lambda x: f"{x[0]:.3f} ({x[1]:3d})" if not math.isnan(x[0]) else "   n/a       "  # noqa: E731
    for label, r in results.items():
        print(f"{label:28s} {fmt(r['mention']):>13s} {fmt(r['negation']):>13s} {fmt(r['uncertain']):>13s} "
              f"{fmt(r['positive']):>13s}")
    summary = {}
    for kind in ("mention", "negation", "uncertain", "positive"):
        for name, labels in (("all", [l for l in CHEXPERT_LABELS if l != "No Finding" or kind in ("positive",)]),
                             ("major", MAJOR)):
            pairs = [results[l][kind] for l in labels if not math.isnan(results[l][kind][0]) and results[l][kind][1]]
            support = sum(s for _, s in pairs)
            summary[(kind, name)] = sum(f * s for f, s in pairs) / support if support else math.nan
    print(f"{'weighted avg (major 9)':28s} " + " ".join(f"{summary[(k, 'major')]:13.3f}"
                                                        for k in ("mention", "negation", "uncertain", "positive")))
    print(f"{'weighted avg (all)':28s} " + " ".join(f"{summary[(k, 'all')]:13.3f}"
                                                    for k in ("mention", "negation", "uncertain", "positive")))
    print("targets: mention F1 >= 0.9 (major), negation F1 >= 0.9, uncertain F1 >= 0.6")
    return summary[("mention", "major")] >= 0.9 and summary[("negation", "all")] >= 0.9 and \
        summary[("uncertain", "all")] >= 0.6


if __name__ == "__main__":
    sys.exit(main())
