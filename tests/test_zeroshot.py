"""rvl.zeroshot: prompt sets (incl. the "No Finding" pitfall), pos/neg scoring, free-text labels, kNN voting, CLI."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from rvl.constants import CHEXPERT_LABELS
from rvl.retrieval import EmbeddingIndex
from rvl.zeroshot import PromptSet, ZeroShotClassifier, knn_zero_shot

VOCAB = ["no", "acute", "cardiopulmonary", "abnormality", "lungs", "clear", "pleural", "effusion", "pneumothorax",
         "normal", "abnormal", "findings", "finding", "large", "right", "left", "apical", "heart", "size", "chest"]


class BagOfWordsModel(torch.nn.Module):
    """Stand-in text tower with a known geometry: a normalised bag of words over VOCAB (unknown words ignored)."""

    embed_dim = len(VOCAB)

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))

    def encode_reports(self, texts, batch_size=64):
        out = torch.zeros(len(texts), self.embed_dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                if word in VOCAB:
                    out[i, VOCAB.index(word)] += 1
        return torch.nn.functional.normalize(out + 1e-6, dim=-1)


def test_packaged_prompt_set_covers_chexpert_and_never_says_no_no_finding():
    prompts = PromptSet.load()
    assert set(CHEXPERT_LABELS) <= set(prompts.labels)
    for label in CHEXPERT_LABELS:
        pos, neg = prompts.prompts(label)
        assert len(pos) >= 3 and len(neg) >= 3 and not set(pos) & set(neg)
    pos, neg = prompts.prompts("No Finding")
    assert not any("finding" in s.lower() and s.lower().startswith("no ") for s in neg)  # CheXzero #19
    assert any("no acute cardiopulmonary abnormality" == s for s in pos)
    pos, neg = prompts.prompts("left apical pneumothorax")  # free text: default templates
    assert "left apical pneumothorax" in pos and "no left apical pneumothorax" in neg


def test_prompt_file_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("labels:\n  Edema:\n    positive: [edema]\n")
    with pytest.raises(ValueError, match="Edema.*negative"):
        PromptSet.load(bad)
    with pytest.raises(FileNotFoundError):
        PromptSet.load(tmp_path / "missing.yaml")


def test_pairwise_softmax_and_across_labels_on_controlled_embeddings():
    eye = np.eye(6, dtype=np.float32)
    clf = ZeroShotClassifier(["a", "b", "c"], positive=eye[:3], negative=eye[3:], logit_scale=5.0)
    image = np.array([[0.8, 0.0, 0.0, 0.0, 0.6, 0.0]], np.float32)  # like a's positive, and b's negative
    probs = clf.predict_proba(image)
    expected = 1 / (1 + np.exp(-5.0 * np.array([0.8 - 0.0, 0.0 - 0.6, 0.0 - 0.0])))
    np.testing.assert_allclose(probs[0], expected, rtol=1e-5)  # softmax([pos, neg]) per label
    across = clf.predict_proba(image, across_labels=True)
    assert np.isclose(across.sum(), 1.0) and across.argmax() == 0
    assert clf.top_labels(image, k=2)[0][0][0] == "a"  # FAISS label index, most similar first
    assert len(clf.label_index) == 3


def test_from_model_ensembles_templates_and_gets_no_finding_right():
    model = BagOfWordsModel()
    prompts = PromptSet({"No Finding": {"positive": ["no acute cardiopulmonary abnormality", "the lungs are clear"],
                                        "negative": ["acute cardiopulmonary abnormality", "abnormal chest findings"]}},
                        default={"positive": ["{}"], "negative": ["no {}"]})
    clf = ZeroShotClassifier.from_model(model, ["No Finding", "left pleural effusion"], prompts)
    emb = model.encode_reports(["no acute cardiopulmonary abnormality", "the lungs are clear"]).numpy()
    mean = emb.mean(0) / np.linalg.norm(emb.mean(0))
    np.testing.assert_allclose(clf.positive[0], mean, atol=1e-6)  # normalised mean of normalised sentences
    assert np.isclose(clf.logit_scale, 10.0, rtol=1e-5)
    normal, abnormal = model.encode_reports(["The lungs are clear. No acute cardiopulmonary abnormality.",
                                             "Large left pleural effusion. Abnormal chest."]).numpy()
    p_normal, p_abnormal = clf.predict_proba(np.stack([normal, abnormal]))
    assert p_normal[0] > 0.5 > p_abnormal[0]  # No Finding: high for the normal study, low for the abnormal one
    assert p_abnormal[1] > p_normal[1]  # the free-text label fires on the study that has it
    # the CheXzero template ("{}" vs "no {}") applied to "No Finding" inverts the label on the same studies
    naive = ZeroShotClassifier.from_model(model, ["No Finding"], PromptSet({}, {"positive": ["{}"],
                                                                               "negative": ["no {}"]}))
    assert naive.predict_proba(np.stack([normal]))[0, 0] < 0.5


def test_knn_voting_is_similarity_weighted():
    vectors = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    meta = pd.DataFrame({"Edema": [1.0, np.nan, 0.0, -1.0], "Fracture": [0.0, 1.0, 1.0, 1.0]})
    index = EmbeddingIndex.build(vectors, np.array([10, 11, 12, 13]), metadata=meta)
    query = np.array([[1, 0.2, 0]], np.float32)
    probs = knn_zero_shot(index, query, k=3, labels=["Edema", "Fracture"], temperature=0.1)
    sims = (vectors[:3] / np.linalg.norm(vectors[:3], axis=1, keepdims=True)) @ (query[0] / np.linalg.norm(query))
    weights = np.exp((sims - sims.max()) / 0.1)
    expected = weights @ np.array([[1, 0], [0, 1], [0, 1]]) / weights.sum()  # blank -> 0
    np.testing.assert_allclose(probs[0], expected, rtol=1e-5)
    # uncertain (-1) votes 0.5; own id excluded per query
    own = knn_zero_shot(index, vectors[3:4], k=1, labels=["Edema"], self_ids=np.array([13]))
    assert own[0, 0] in (1.0, 0.0)  # the neighbour that votes is not id 13 (which would give 0.5)
    assert knn_zero_shot(index, vectors[3:4], k=1, labels=["Edema"])[0, 0] == 0.5
    with pytest.raises(ValueError, match="label columns"):
        knn_zero_shot(index, query, labels=["Cardiomegaly"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from rvl.model import create_model

    out = tmp_path_factory.mktemp("model") / "tiny"
    create_model("rvl-tiny").save_pretrained(out)
    return out


def test_real_model_and_cli(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    from rvl.cli import main
    from rvl.model import from_pretrained

    model = from_pretrained(tiny_model_dir)
    clf = ZeroShotClassifier.from_model(model, ["Pleural Effusion", "left apical pneumothorax"])
    assert clf.positive.shape == (2, model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(clf.negative, axis=1), 1.0, rtol=1e-5)
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(80, 64), (64, 64)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(paths[-1])
    assert main(["zeroshot", "--model", str(tiny_model_dir), "--images", *map(str, paths),
                 "--labels", "Pleural Effusion,left apical pneumothorax", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in result] == [str(p) for p in paths]
    assert all(set(r["probabilities"]) == {"Pleural Effusion", "left apical pneumothorax"} for r in result)
    assert all(0 <= p <= 1 for r in result for p in r["probabilities"].values())
    assert main(["zeroshot", "--model", str(tiny_model_dir), "--images", *map(str, paths), "--study"]) == 0
    capsys.readouterr()
    assert main(["zeroshot", "--model", str(tiny_model_dir), "--images", str(paths[0]), "--top", "3", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert len(top) == 3 and set(top) <= set(CHEXPERT_LABELS)
    assert main(["zeroshot", "--model", str(tiny_model_dir), "--images", str(tmp_path / "missing.png")]) == 2
    # kNN zero-shot from a report index built with this model: probabilities are neighbour vote fractions
    from rvl.retrieval.embed import embed_texts, model_fingerprint

    reports = ["Large left pleural effusion.", "No acute cardiopulmonary process.", "Small right pneumothorax."]
    meta = pd.DataFrame({"Pleural Effusion": [1.0, 0.0, np.nan], "Pneumothorax": [0.0, 0.0, 1.0]})
    EmbeddingIndex.build(embed_texts(model, reports), np.arange(3), metadata=meta,
                         model_fingerprint=model_fingerprint(tiny_model_dir)).save(tmp_path / "reports")
    capsys.readouterr()
    assert main(["zeroshot", "--model", str(tiny_model_dir), "--images", str(paths[0]), "--knn-index",
                 str(tmp_path / "reports"), "-k", "3", "--json"]) == 0
    knn = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert set(knn) == {"Pleural Effusion", "Pneumothorax"} and all(0 < p < 1 for p in knn.values())


def test_scoring_builds_no_faiss_index():
    """faiss is an extra: prompt scoring (and so training-time validation) must not need it; the label index is built
    only when ``top_labels`` asks for it."""
    eye = np.eye(4, dtype=np.float32)
    clf = ZeroShotClassifier(["a", "b"], positive=eye[:2], negative=eye[2:], logit_scale=5.0)
    probs = clf.predict_proba(np.array([[1.0, 0, 0, 0]], np.float32))
    assert probs[0, 0] > 0.9 and probs[0, 1] == 0.5
    assert "label_index" not in vars(clf)
    assert clf.top_labels(np.array([[1.0, 0, 0, 0]], np.float32), k=1)[0][0][0] == "a"
    assert "label_index" in vars(clf)
