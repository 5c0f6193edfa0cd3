"""Evaluation and report stages of ``rvl demo`` (see :mod:`rvl.demo`): both models on the held-out test patients
through ``rvl.evaluate.evaluate_model``, the multi-view gain on lateral-visible findings, and metrics.json/report.html.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np



# ------------------------------------------------------------------------------------------------ 6. evaluate
def binary_target(values: np.ndarray) -> np.ndarray:
    """Ground truth for AUC: 1 positive, 0 negative or not drawn (the phantoms' truth is complete), NaN uncertain."""
    values = np.asarray(values, dtype=float)
    return np.where(values == 1.0, 1.0, np.where(values == -1.0, np.nan, 0.0))


def lateral_only_labels(findings_json: str) -> set[str]:
    """Labels of a study's findings that the phantoms drew visible mainly on the lateral view."""
    try:
        findings = json.loads(findings_json) if isinstance(findings_json, str) and findings_json else []
    except ValueError:
        return set()
    return {f["label"] for f in findings if f.get("lateral_only")}


def multiview_gain(truth, scores_mv: np.ndarray, scores_fr: np.ndarray, labels: list[str],
                   min_positives: int = 5) -> dict[str, Any]:
    """AUC of each model on the lateral-visible findings: positives = studies whose finding of that label is drawn
    lateral-only, negatives = studies without the label. Gain = mean over labels (multi-view minus frontal-only)."""
    from sklearn.metrics import roc_auc_score

    lateral = [lateral_only_labels(f) for f in truth["findings"]] if "findings" in truth else [set()] * len(truth)
    per_label = {}
    for j, label in enumerate(labels):
        y = binary_target(truth[label].to_numpy())
        pos = np.array([label in s for s in lateral]) & (y == 1)
        neg = y == 0
        if pos.sum() < min_positives or neg.sum() < min_positives:
            continue
        keep = pos | neg
        per_label[label] = {"multiview_auc": float(roc_auc_score(pos[keep], scores_mv[keep, j])),
                            "frontal_auc": float(roc_auc_score(pos[keep], scores_fr[keep, j])),
                            "n_pos": int(pos.sum()), "n_neg": int(neg.sum())}
    if not per_label:
        return {"per_label": {}, "multiview_auc": None, "frontal_auc": None, "gain_auc": None,
                "note": f"fewer than {min_positives} lateral-only positives of any label in the test split"}
    mv = float(np.mean([r["multiview_auc"] for r in per_label.values()]))
    fr = float(np.mean([r["frontal_auc"] for r in per_label.values()]))
    return {"per_label": per_label, "multiview_auc": mv, "frontal_auc": fr, "gain_auc": mv - fr,
            "labels": list(per_label)}


def _predictions(eval_dir: Path, labels: list[str]):
    import pandas as pd

    frame = pd.read_csv(eval_dir / "predictions.csv", dtype={"study_id": str}).set_index("study_id")
    return frame[[f"prompt:{label}" for label in labels]].set_axis(labels, axis=1)


def stage_evaluate(output: Path, phantoms: dict[str, Any], prepared: dict[str, Any], trained: dict[str, Any],
                   indexes: dict[str, Any], device: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """``rvl.evaluate.evaluate_model`` on the held-out test patients for both models, then the multi-view gain."""
    from rvl.constants import CHEXPERT_LABELS
    from rvl.data import read_manifest
    from rvl.evaluate import evaluate_model
    from rvl.retrieval.embed import load_model

    ev = recipe["eval"]
    results = {}
    for key, cache in (("multiview", prepared["cache"]), ("frontal", prepared["frontal_cache"])):
        model = load_model(trained[key]["model_dir"], device)
        print(f"evaluating the {key} model on the test split", flush=True)
        results[key] = evaluate_model(model, cache, "test", output / f"eval_{key}", k_knn=ev["knn_k"],
                                      n_bootstrap=ev["bootstrap"], heatmap_examples=ev["heatmap_examples"],
                                      seed=0)
    truth = read_manifest(phantoms["manifest"]).set_index("study_id", drop=False)
    labels = list(CHEXPERT_LABELS)
    mv_scores = _predictions(output / "eval_multiview", labels)
    fr_scores = _predictions(output / "eval_frontal", labels)
    common = [s for s in mv_scores.index if s in fr_scores.index]
    test_truth = truth.loc[common]
    gain = multiview_gain(test_truth, mv_scores.loc[common].to_numpy(), fr_scores.loc[common].to_numpy(), labels)
    gain["frontal_macro_auc"] = results["frontal"]["zeroshot_prompt"]["macro"]["auc"]
    gain["n_studies"] = len(common)
    return {"multiview": results["multiview"], "frontal": results["frontal"], "gain": gain,
            "eval_dirs": {k: str(output / f"eval_{k}") for k in results}, "truth_manifest": phantoms["manifest"],
            "n_test_patients": int(test_truth["patient_id"].nunique())}


# ------------------------------------------------------------------------------------------------ 7. report
def _drawn(per_label: dict[str, Any], min_positives: int = 5) -> dict[str, Any]:
    """The labels the phantoms draw in the test split (enough positives and negatives for an AUC)."""
    return {k: v for k, v in per_label.items() if v.get("auc") is not None and v["n_pos"] >= min_positives
            and v["n_neg"] >= min_positives}


def assemble_metrics(phantoms, labels, prepared, trained, indexes, evaluation, settings) -> dict[str, Any]:
    """metrics.json: the documented keys first (``zeroshot.macro_auc`` ...), then details."""
    mv = evaluation["multiview"]
    prompt = _drawn(mv["zeroshot_prompt"]["per_label"])
    knn_all = mv.get("zeroshot_knn", {}).get("per_label", {})
    knn = {k: knn_all[k] for k in prompt if k in knn_all and knn_all[k].get("auc") is not None}
    zs_macro = float(np.mean([v["auc"] for v in prompt.values()])) if prompt else None
    on_reports = mv.get("zeroshot_prompt_on_reports", {}).get("per_label", {})
    text_side = [on_reports[k]["auc"] for k in prompt if on_reports.get(k, {}).get("auc") is not None]
    knn_macro = float(np.mean([v["auc"] for v in knn.values()])) if knn else None
    pointing = mv.get("pointing_game", {})
    gain = evaluation["gain"]
    return {
        "zeroshot": {"macro_auc": zs_macro, "per_label": prompt, "labels": list(prompt),
                     "all_labels": mv["zeroshot_prompt"]["per_label"],
                     # prompts applied to the test reports' embeddings: the text side's ceiling for zero-shot
                     "macro_auc_on_reports": float(np.mean(text_side)) if text_side else None},
        "knn": {"macro_auc": knn_macro, "per_label": knn, "k": mv.get("zeroshot_knn", {}).get("k"),
                "gap": None if zs_macro is None or knn_macro is None else abs(zs_macro - knn_macro)},
        "retrieval": {"study_to_report": mv["retrieval"]["study_to_report"],
                      "report_to_study": mv["retrieval"]["report_to_study"],
                      "n_unique_reports": mv["retrieval"].get("n_unique_reports")},
        "pointing_game": pointing.get("accuracy"), "pointing_game_n": pointing.get("n"),
        "pointing_game_per_label": pointing.get("per_label"),
        "multiview": {k: v for k, v in gain.items()},
        "labeler": {k: labels[k] for k in ("agreement", "mention", "per_label", "n_reports", "reports_per_s")},
        "training": {"steps": trained["steps"], "batch_size": trained["batch_size"],
                     "seconds": {k: trained[k]["seconds"] for k in ("multiview", "frontal")}},
        "data": {"splits": phantoms["splits"], "images": phantoms["images"], "n_test_studies": mv["n_studies"],
                 "n_test_patients": evaluation["n_test_patients"], "indexed_studies": indexes["count"]},
        "settings": settings,
    }


def retrieval_example(indexes: dict[str, Any], evaluation: dict[str, Any], k: int = 4):
    """A held-out query study with its most similar studies from other patients, read from the study index."""
    from rvl.data import read_image
    from rvl.demo.report import RetrievalExample
    from rvl.retrieval import EmbeddingIndex

    index = EmbeddingIndex.load(indexes["study_index"])
    meta = index.metadata
    test = meta[meta["split"] == "test"]
    abnormal = test[(test.get("Pleural Effusion", 0) == 1) | (test.get("Cardiomegaly", 0) == 1)]
    query = (abnormal if len(abnormal) else test).iloc[0]

    def frontal(row) -> np.ndarray:
        from rvl.data.dataset import select_views

        paths, views = json.loads(row["image_paths"]), json.loads(row["view_positions"])
        return read_image(paths[select_views([str(v).upper() for v in views], 1, None)[0]])

    vector = index.reconstruct([int(query["id"])]) if hasattr(index, "reconstruct") else None
    if vector is None:
        return None
    others = meta.index[meta["patient_id"] == query["patient_id"]].to_numpy()
    scores, ids = index.search(np.asarray(vector, np.float32).reshape(1, -1), k, excluded_ids=others)
    hits = []
    for score, i in zip(scores[0], ids[0]):
        if i < 0:
            continue
        row = meta.loc[int(i)]
        hits.append({"image": frontal(row), "report": row["report"], "study_id": row["study_id"],
                     "score": float(score), "same_patient": row["patient_id"] == query["patient_id"]})
    return RetrievalExample(frontal(query), query["report"], str(query["study_id"]), hits)


def lateral_curves(output: Path, evaluation: dict[str, Any]) -> dict[str, dict[str, tuple]]:
    """(y, score) per model for each label of the multi-view comparison, from the saved predictions."""
    from rvl.constants import CHEXPERT_LABELS
    from rvl.data import read_manifest

    labels = list(evaluation["gain"].get("per_label", {}))
    if not labels:
        return {}
    truth = read_manifest(evaluation["truth_manifest"]).set_index("study_id", drop=False)
    mv = _predictions(Path(evaluation["eval_dirs"]["multiview"]), list(CHEXPERT_LABELS))
    fr = _predictions(Path(evaluation["eval_dirs"]["frontal"]), list(CHEXPERT_LABELS))
    common = [s for s in mv.index if s in fr.index]
    t = truth.loc[common]
    lateral = [lateral_only_labels(f) for f in t["findings"]]
    curves = {}
    for label in labels:
        y = binary_target(t[label].to_numpy())
        pos = np.array([label in s for s in lateral]) & (y == 1)
        keep = pos | (y == 0)
        curves[label] = {"multi-view": (pos[keep], mv.loc[common, label].to_numpy()[keep]),
                         "frontal-only": (pos[keep], fr.loc[common, label].to_numpy()[keep])}
    return curves


def stage_report(output: Path, metrics: dict[str, Any], evaluation: dict[str, Any], indexes: dict[str, Any]) -> None:
    from rvl.fileio import write_json_atomic
    from rvl.demo.report import check_targets, roc_figure, write_html_report

    figures: dict[str, Any] = {}
    for key in ("multiview", "frontal"):
        for name, path in evaluation[key].get("figures", {}).items():
            figures[f"{key}:{name}"] = Path(path).read_bytes()
    figures["heatmaps"] = [Path(p).read_bytes() for p in evaluation["multiview"].get("pointing_game", {})
                           .get("examples", [])]
    try:
        curves = lateral_curves(output, evaluation)
        if curves:
            figures["roc_lateral"] = roc_figure(curves, "lateral-visible findings: multi-view vs frontal-only")
    except Exception as err:
        print(f"warning: no lateral-visible ROC figure ({type(err).__name__}: {err})", flush=True)
    try:
        example = retrieval_example(indexes, evaluation)
    except Exception as err:  # the report must still be written; say what went wrong
        print(f"warning: no retrieval example in the report ({type(err).__name__}: {err})", flush=True)
        example = None
    metrics["targets"] = {row["key"]: {"value": row["value"], "goal": f"{row['op']} {row['threshold']}",
                                       "met": row["met"]} for row in check_targets(metrics)}
    from rvl.integrity import write_sidecar

    write_json_atomic(output / "metrics.json", metrics)
    write_html_report(output / "report.html", metrics, figures, example)
    for name in ("metrics.json", "report.html"):  # rvl verify checks the demo's own files too
        write_sidecar(output / name)
