"""``rvl evaluate``: zero-shot AUC (prompt and kNN) with bootstrap CIs, retrieval R@K both ways, pointing game.

One pass embeds the evaluation split's studies (fused multi-view) and reports; the training split's reports form the
kNN voting index (their label columns, or ``rvl.nlp`` labels when the manifest has none). Writes ``metrics.json``,
``predictions.csv`` (per-study probabilities, so every number can be recomputed), ROC-curve PNGs and example
grounding-heatmap PNGs.

Targets: 1 = positive; 0 or blank = negative; -1 (uncertain) is left out of that label's AUC.
Retrieval: a hit is the study's own report or any report with the identical text (templated reports repeat).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rvl.constants import CHEXPERT_LABELS
from rvl.fileio import write_text_atomic

logger = logging.getLogger(__name__)


def eval_targets(frame: Any, labels: Sequence[str]) -> np.ndarray:
    """(N, L) targets: 1 positive, 0 negative/blank, NaN uncertain (excluded)."""
    values = frame[list(labels)].to_numpy(dtype=np.float64, na_value=np.nan)
    out = np.where(np.isnan(values), 0.0, values)
    return np.where(out < 0, np.nan, out)


def _report_labels(frame: Any, labels: Sequence[str], source: str = "auto") -> Any:
    """Label columns for kNN voting: the frame's (``"manifest"``), ``rvl.nlp`` labels of its reports (``"nlp"``), or
    ``"auto"``: the frame's when present and not all blank, else ``rvl.nlp``."""
    if source not in ("auto", "manifest", "nlp"):
        raise ValueError(f"label source must be auto, manifest or nlp, got {source!r}")
    present = all(c in frame for c in labels) and frame[list(labels)].notna().to_numpy().any()
    if source == "manifest" and not present:
        raise ValueError("the data has no label columns; use rvl.nlp labels (knn label source 'nlp' or 'auto')")
    if present and source != "nlp":
        return frame[list(labels)].reset_index(drop=True)
    try:
        from rvl.nlp import label_reports
    except ImportError:
        if source == "nlp":
            raise
        logger.warning("no label columns and rvl.nlp.label_reports unavailable: labels left blank")
        return frame.reindex(columns=list(labels)).astype(float).reset_index(drop=True)
    logger.info("labelling %d reports with rvl.nlp", len(frame))
    return label_reports(list(frame["report"]))[list(labels)].reset_index(drop=True)


def pointing_game(model: Any, dataset: Any, max_images: int = 200, batch_size: int = 16,
                  examples: int = 4, out_dir: Path | None = None) -> dict[str, Any]:
    """Heatmap pointing-game accuracy over the dataset's ``finding_boxes`` (one trial per box with a known label).

    The prompt is the box's finding with its side ("left pleural effusion"). A hit = the heatmap maximum lies in the
    box. Boxes are compared in the padded square frame the model sees.
    """
    from rvl.data.io import ImageReadError, box_to_square, read_image, to_square_uint8
    from rvl.heatmap import grounding_heatmaps, pointing_hit, save_overlay

    frame = dataset.frame
    if "finding_boxes" not in frame:
        return {"accuracy": None, "n": 0, "note": "no finding_boxes column"}
    trials = []  # (study row, view, path, prompt, box, label)
    for i in range(len(frame)):
        raw = frame["finding_boxes"].iloc[i]
        if not isinstance(raw, str) or not raw.strip():
            continue
        for j, (path, boxes) in enumerate(zip(frame["image_paths"].iloc[i], json.loads(raw))):
            for box in boxes or []:
                side = box.get("side")
                finding = str(box.get("finding") or box.get("label") or "").lower()
                prompt = f"{side} {finding}" if side in ("left", "right") and side not in finding else finding
                trials.append((i, j, path, prompt, box["box"], box.get("label", finding)))
    trials = trials[:max_images]
    if not trials:
        return {"accuracy": None, "n": 0, "note": "no boxes in this split"}
    size, hits, per_label, skipped, written = model.image_size, [], {}, 0, []
    from_cache = bool(getattr(dataset, "is_cache", False))
    for start in range(0, len(trials), batch_size):
        squares, prompts, boxes, names = [], [], [], []
        for i, j, path, prompt, box, label in trials[start:start + batch_size]:
            if from_cache:  # cached pixels and boxes are both in the padded square frame already
                squares.append(dataset._study_images(i, [j])[0])
                boxes.append(list(box))
            else:
                try:
                    image = read_image(path)
                except ImageReadError as err:
                    skipped += 1
                    logger.warning("pointing game: skipping %s", err)
                    continue
                squares.append(to_square_uint8(image, size))
                boxes.append(box_to_square(box, *image.shape, size))
            prompts.append(prompt)
            names.append((path, label))
        if not squares:
            continue
        heatmaps = grounding_heatmaps(model, squares, prompts)
        for square, heatmap, prompt, box, (path, label) in zip(squares, heatmaps, prompts, boxes, names):
            hit = pointing_hit(heatmap, box)
            hits.append(hit)
            per_label.setdefault(label, []).append(hit)
            if out_dir is not None and len(written) < examples:
                name = f"heatmap_{len(written):02d}_{prompt.replace(' ', '_')[:40]}.png"
                written.append(str(save_overlay(square, heatmap, out_dir / name, boxes=[box],
                                                title=f"{Path(path).name}: '{prompt}' ({'hit' if hit else 'miss'})")))
    return {"accuracy": float(np.mean(hits)) if hits else None, "n": len(hits), "skipped": skipped,
            "per_label": {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(per_label.items())},
            "examples": written}


def evaluate_model(model: Any, data: str | os.PathLike, split: str = "test", out_dir: str | os.PathLike | None = None,
                   *, train_split: str = "train", labels: Sequence[str] | None = None, prompts: Any = None,
                   k_knn: int = 20, n_bootstrap: int = 1000, batch_size: int = 32, max_pointing: int = 200,
                   heatmap_examples: int = 4, seed: int = 0, knn_labels: str = "auto") -> dict[str, Any]:
    """Evaluate a model on one split of a manifest / prepared cache.

    Args:
        model: An :class:`rvl.model.RVLModel` (any device).
        data: Manifest or prepared-cache folder (what :class:`rvl.data.StudyDataset` accepts).
        split: Split to evaluate.
        out_dir: Folder for ``metrics.json``, ``predictions.csv`` and PNGs (``None``: nothing written).
        train_split: Split whose reports vote in kNN zero-shot (skipped if absent).
        labels: Labels (default: the 14 CheXpert labels).
        prompts: :class:`rvl.zeroshot.PromptSet` or prompt file (default: the packaged set).
        k_knn: Voting neighbours.
        n_bootstrap: Bootstrap resamples for the CIs.
        batch_size: Studies per forward pass.
        max_pointing: Boxes used for the pointing game at most.
        heatmap_examples: Example heatmap PNGs to write.
        seed: Bootstrap seed.
        knn_labels: Labels the kNN neighbours vote with: ``"manifest"`` columns, ``"nlp"`` (``rvl.nlp`` labels of
            the training reports) or ``"auto"`` (manifest columns when present, else ``rvl.nlp``).

    Returns:
        The metrics dict (also written to ``out_dir/metrics.json``).
    """
    from rvl.data import StudyDataset
    from rvl.metrics import bootstrap_auc, recall_at_k, save_roc_figure
    from rvl.retrieval import EmbeddingIndex
    from rvl.retrieval.embed import embed_dataset, embed_texts, model_fingerprint
    from rvl.zeroshot import ZeroShotClassifier, knn_zero_shot

    labels = list(labels or CHEXPERT_LABELS)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    max_views = int(getattr(model, "rvl_cfg", {}).get("max_views", 2))
    dataset = StudyDataset(data, split=split, max_views=max_views, image_transform=model.preprocess, train=False)
    emb = embed_dataset(model, dataset, batch_size=batch_size, desc=f"embedding {split}")
    frame = dataset.frame.iloc[emb["index"]].reset_index(drop=True)
    targets = eval_targets(frame, labels)
    result: dict[str, Any] = {"split": split, "n_studies": len(frame), "labels": labels,
                              "model_fingerprint": model_fingerprint(model), "data": str(data)}

    classifier = ZeroShotClassifier.from_model(model, labels, prompts)
    prompt_probs = classifier.predict_proba(emb["study"])
    result["zeroshot_prompt"] = bootstrap_auc(prompt_probs, targets, n_bootstrap, seed, labels)
    # the same prompt classifier on the studies' own report embeddings: how well the text tower reads the prompts,
    # an upper bound of prompt zero-shot that no image tower can pass
    result["zeroshot_prompt_on_reports"] = bootstrap_auc(classifier.predict_proba(emb["report"]), targets,
                                                         n_bootstrap, seed, labels)

    knn_probs = None
    try:
        train = StudyDataset(data, split=train_split, max_views=1, train=False)
    except ValueError as err:
        result["zeroshot_knn"] = {"note": f"skipped: {err}"}
    else:
        train_frame = train.frame.reset_index(drop=True)
        train_labels = _report_labels(train_frame, labels, knn_labels)
        report_index = EmbeddingIndex.build(
            embed_texts(model, train_frame["report"].astype(str).tolist()), np.arange(len(train_frame)),
            metadata=train_labels.assign(study_id=train_frame["study_id"].astype(str).to_numpy()),
            model_fingerprint=result["model_fingerprint"])
        # evaluating the voting split itself: a study's own report must not vote for it
        own = emb["index"].astype(np.int64) if train_split == split else None
        knn_probs = knn_zero_shot(report_index, emb["study"], k=min(k_knn, len(train_frame)), labels=labels,
                                  self_ids=own)
        result["zeroshot_knn"] = {**bootstrap_auc(knn_probs, targets, n_bootstrap, seed, labels),
                                  "k": k_knn, "index_size": len(train_frame), "label_source": knn_labels}

    similarity = emb["study"] @ emb["report"].T
    texts = frame["report"].astype(str).to_numpy()
    same_text = texts[:, None] == texts[None, :]
    result["retrieval"] = {"study_to_report": recall_at_k(similarity, same_text),
                           "report_to_study": recall_at_k(similarity.T, same_text.T),
                           "n_unique_reports": int(len(set(texts)))}
    try:
        result["pointing_game"] = pointing_game(model, dataset, max_pointing, examples=heatmap_examples, out_dir=out)
    except NotImplementedError as err:  # image towers without patch tokens
        result["pointing_game"] = {"accuracy": None, "n": 0, "note": str(err)}

    if out is not None:
        import pandas as pd

        predictions = pd.DataFrame({"study_id": frame["study_id"].astype(str)})
        for j, label in enumerate(labels):
            predictions[f"prompt:{label}"] = prompt_probs[:, j]
            if knn_probs is not None:
                predictions[f"knn:{label}"] = knn_probs[:, j]
        predictions.to_csv(out / "predictions.csv", index=False)
        figures = {"roc_prompt": save_roc_figure(prompt_probs, targets, labels, out / "roc_prompt.png",
                                                 "prompt zero-shot ROC")}
        if knn_probs is not None:
            figures["roc_knn"] = save_roc_figure(knn_probs, targets, labels, out / "roc_knn.png", "kNN zero-shot ROC")
        result["figures"] = {k: str(v) for k, v in figures.items() if v is not None}
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def format_summary(result: dict[str, Any]) -> str:
    """Human-readable table of the main numbers."""
    def fmt(entry: dict) -> str:
        if not entry or entry.get("auc") is None:
            return "   n/a              "
        return f"{entry['auc']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"

    prompt, knn = result["zeroshot_prompt"], result.get("zeroshot_knn", {})
    lines = [f"{result['split']}: {result['n_studies']} studies", f"{'label':<28} {'prompt AUC [95% CI]':<24} "
             f"{'kNN AUC [95% CI]':<24} pos/neg"]
    for label in result["labels"]:
        p = prompt["per_label"][label]
        lines.append(f"{label:<28} {fmt(p):<24} {fmt(knn.get('per_label', {}).get(label, {})):<24} "
                     f"{p['n_pos']}/{p['n_neg']}")
    lines.append(f"{'macro':<28} {fmt(prompt['macro']):<24} {fmt(knn.get('macro', {})):<24}")
    for direction, values in result["retrieval"].items():
        if isinstance(values, dict):
            lines.append(f"{direction}: " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    pointing = result["pointing_game"]
    if pointing.get("accuracy") is not None:
        lines.append(f"pointing game: {pointing['accuracy']:.3f} over {pointing['n']} boxes")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model: an rvl export folder, an unmodified open_clip model (local-dir:DIR or its folder, "
                        "hf-hub:ORG/NAME) or NAME:TAG (open_clip name and pretrained tag, e.g. ViT-B-16:openai)")
    parser.add_argument("--data", required=True, help="manifest or prepared cache")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--train-split", default="train", help="split whose reports vote in kNN zero-shot")
    parser.add_argument("--out", default=None, help="output folder (metrics.json, predictions.csv, PNGs)")
    parser.add_argument("--prompts", default=None, help="prompt YAML (default: packaged CheXpert set)")
    parser.add_argument("--knn-labels", choices=("auto", "manifest", "nlp"), default="auto",
                        help="labels the kNN neighbours vote with (default: manifest columns, else rvl.nlp)")
    parser.add_argument("-k", "--k", type=int, default=20, dest="k", help="kNN voting neighbours (default 20)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-pointing", type=int, default=200, help="boxes used for the pointing game at most")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print metrics JSON instead of the summary table")


def run(args: argparse.Namespace) -> int:
    from rvl.retrieval.embed import load_model

    try:
        model = load_model(args.model, args.device)
        result = evaluate_model(model, args.data, args.split, args.out, train_split=args.train_split,
                                prompts=args.prompts, k_knn=args.k, n_bootstrap=args.bootstrap,
                                batch_size=args.batch_size, max_pointing=args.max_pointing,
                                knn_labels=args.knn_labels)
    except (FileNotFoundError, ValueError) as err:
        print(f"rvl evaluate: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_summary(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0
