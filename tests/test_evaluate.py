"""rvl.metrics and rvl.evaluate: AUC + bootstrap CIs, recall@K, and the evaluation of a model on phantoms."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from rvl.metrics import auc_by_ranks, bootstrap_auc, recall_at_k


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 50)
        s = np.round(rng.random(50) + 0.3 * y, 1)  # many ties
        assert np.isclose(auc_by_ranks(s[None], y[None])[0], roc_auc_score(y, s))
    assert np.isnan(auc_by_ranks(np.ones((1, 4)), np.ones((1, 4)))[0])


def test_bootstrap_ci_brackets_auc_narrows_with_n_and_is_seeded():
    rng = np.random.default_rng(1)

    def sample(n):
        y = rng.integers(0, 2, (n, 2)).astype(float)
        s = y + rng.normal(0, 1.0, (n, 2))
        return s, y

    s_small, y_small = sample(60)
    s_big, y_big = sample(2000)
    y_small[:5, 1] = np.nan  # uncertain: left out of label 1 only
    small = bootstrap_auc(s_small, y_small, n_bootstrap=300, seed=3, labels=["a", "b"])
    big = bootstrap_auc(s_big, y_big, n_bootstrap=300, seed=3, labels=["a", "b"])
    for label in ("a", "b"):
        entry = small["per_label"][label]
        assert entry["ci_low"] < entry["auc"] < entry["ci_high"]
        width_small = entry["ci_high"] - entry["ci_low"]
        width_big = big["per_label"][label]["ci_high"] - big["per_label"][label]["ci_low"]
        assert width_big < width_small / 2  # ~1/sqrt(n)
    keep = ~np.isnan(y_small[:, 1])
    assert np.isclose(small["per_label"]["b"]["auc"], roc_auc_score(y_small[keep, 1], s_small[keep, 1]))
    assert small["per_label"]["b"]["n_pos"] + small["per_label"]["b"]["n_neg"] == 55
    assert small == bootstrap_auc(s_small, y_small, n_bootstrap=300, seed=3, labels=["a", "b"])
    assert np.isclose(small["macro"]["auc"], np.mean([small["per_label"][k]["auc"] for k in "ab"]))
    one_class = bootstrap_auc(s_small, np.zeros_like(y_small), n_bootstrap=10)
    assert one_class["per_label"]["label_0"]["auc"] is None and one_class["macro"]["auc"] is None


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    relevant = np.eye(3, dtype=bool)
    assert recall_at_k(sim, relevant, ks=(1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}


@pytest.fixture(scope="module")
def phantom_setup(tmp_path_factory):
    from rvl.model import create_model
    from rvl.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("eval")
    generate_phantoms(root / "ph", 80, size=64, seed=1, progress=False)
    model_dir = create_model("rvl-tiny").save_pretrained(root / "model")
    return root / "ph" / "manifest.parquet", model_dir, root


def test_evaluate_model_on_phantoms(phantom_setup):
    from rvl.evaluate import evaluate_model
    from rvl.model import from_pretrained

    manifest, model_dir, root = phantom_setup
    out = root / "eval_out"
    result = evaluate_model(from_pretrained(model_dir), manifest, split="validate", out_dir=out, n_bootstrap=50,
                            max_pointing=12, heatmap_examples=2)
    frame = pd.read_parquet(manifest)
    assert result["n_studies"] == int((frame["split"] == "validate").sum())
    for kind in ("zeroshot_prompt", "zeroshot_prompt_on_reports", "zeroshot_knn"):
        macro = result[kind]["macro"]
        assert macro["auc"] is None or 0 <= macro["ci_low"] <= macro["auc"] <= macro["ci_high"] <= 1
        assert set(result[kind]["per_label"]) == set(result["labels"])
    assert result["zeroshot_knn"]["index_size"] == int((frame["split"] == "train").sum())
    for direction in ("study_to_report", "report_to_study"):
        r = result["retrieval"][direction]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1
    pointing = result["pointing_game"]
    assert pointing["n"] > 0 and 0 <= pointing["accuracy"] <= 1 and len(pointing["examples"]) == 2
    assert json.loads((out / "metrics.json").read_text())["n_studies"] == result["n_studies"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == result["n_studies"] and "prompt:No Finding" in predictions and "knn:Edema" in predictions
    assert (out / "roc_prompt.png").is_file() or result["zeroshot_prompt"]["macro"]["auc"] is None


def test_evaluate_cli(phantom_setup, tmp_path, capsys):
    from rvl.cli import main

    manifest, model_dir, _ = phantom_setup
    assert main(["evaluate", "--model", str(model_dir), "--data", str(manifest), "--split", "test", "--out",
                 str(tmp_path / "ev"), "--bootstrap", "20", "--max-pointing", "4", "--knn-labels", "nlp"]) == 0
    text = capsys.readouterr().out
    assert "macro" in text and "R@1" in text and (tmp_path / "ev" / "metrics.json").is_file()
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["zeroshot_knn"]["label_source"] == "nlp"  # neighbours vote with rvl.nlp labels of the reports
    assert main(["evaluate", "--model", str(model_dir), "--data", str(manifest), "--split", "nope"]) == 2


def test_validation_recall_counts_identical_reports_as_hits_like_rvl_evaluate():
    import torch

    from rvl.train_support import retrieval_recall

    studies = torch.eye(3)
    reports = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])  # study 0 is closest to report 1, and vice versa
    distinct = torch.tensor([[5, 6], [7, 8], [9, 9]])
    same_01 = torch.tensor([[5, 6], [5, 6], [9, 9]])  # reports 0 and 1 have the same text
    assert retrieval_recall(studies, reports, distinct, ks=(1,))["study_to_report_R@1"] == pytest.approx(1 / 3)
    both = retrieval_recall(studies, reports, same_01, ks=(1,))
    assert both["study_to_report_R@1"] == 1.0 and both["report_to_study_R@1"] == 1.0
