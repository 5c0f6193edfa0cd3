"""Zero-shot classification of studies: prompt ensembles (CheXzero-style pos/neg softmax) and kNN report voting.

Prompt sets are data (``rvl/prompts/chexpert.yaml``): per observation several positive and several negative
sentences, embedded, normalised, averaged and re-normalised per side. The probability of a label is the softmax
between its positive and negative similarity, scaled by the model's learned temperature; ``softmax across labels``
(one finding per image) is an option. Free-text labels ("left apical pneumothorax") use the default templates, whose
negative side negates the text. The positive prompt embeddings live in a FAISS inner-product index
(:class:`rvl.retrieval.EmbeddingIndex`) so that ranking a large label vocabulary against an image scales.

kNN zero-shot needs no prompts: the ``k`` most similar reports of an index whose metadata carries label columns (from
``rvl.nlp`` or the manifest) vote, weighted by ``exp(similarity / temperature)``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rvl.constants import CHEXPERT_LABELS
from rvl.data.io import MIN_IMAGE_SIDE

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = "chexpert.yaml"
DEGENERATE_OVERRIDE = "pass --allow-degenerate to score it anyway"


@dataclass
class PromptSet:
    """Positive / negative prompt templates per label, plus default templates for any other (free-text) label."""

    labels: dict[str, dict[str, list[str]]]
    default: dict[str, list[str]] = field(default_factory=lambda: {"positive": ["{}"], "negative": ["no {}"]})
    source: str = "<memory>"

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PromptSet":
        """Read a prompt YAML/JSON file (``None`` = the packaged CheXpert set)."""
        import yaml

        if path is None:
            text, source = resources.files("rvl").joinpath("prompts", DEFAULT_PROMPTS).read_text("utf-8"), \
                f"rvl/prompts/{DEFAULT_PROMPTS}"
        else:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {path} does not exist")
            text, source = path.read_text("utf-8"), str(path)
        try:
            data = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as err:
            raise ValueError(f"{source}: not valid YAML ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("labels", {}), dict):
            raise ValueError(f"{source}: expected a mapping with 'labels' (label -> positive/negative lists)")
        labels = {}
        for label, sides in (data.get("labels") or {}).items():
            if not isinstance(sides, dict) or not sides.get("positive") or not sides.get("negative"):
                raise ValueError(f"{source}: label {label!r} needs non-empty 'positive' and 'negative' lists")
            labels[str(label)] = {side: [str(s) for s in sides[side]] for side in ("positive", "negative")}
        default = data.get("default") or {"positive": ["{}"], "negative": ["no {}"]}
        for side in ("positive", "negative"):
            if not default.get(side) or not all("{}" in t for t in default[side]):
                raise ValueError(f"{source}: default.{side} must be a non-empty list of templates containing '{{}}'")
        return cls(labels, {s: list(default[s]) for s in ("positive", "negative")}, source)

    def prompts(self, label: str) -> tuple[list[str], list[str]]:
        """(positive sentences, negative sentences) of a label; unknown labels are filled into the default templates."""
        if label in self.labels:
            return self.labels[label]["positive"], self.labels[label]["negative"]
        text = label.strip().lower()
        return [t.format(text) for t in self.default["positive"]], [t.format(text) for t in self.default["negative"]]


def _mean_direction(embeddings: np.ndarray) -> np.ndarray:
    mean = embeddings.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


class ZeroShotClassifier:
    """Per-label positive and negative text directions; scores image / study embeddings.

    Args:
        labels: Label names, in output column order.
        positive: ``(L, D)`` normalised positive prompt embeddings (template ensembles).
        negative: ``(L, D)`` normalised negative prompt embeddings.
        logit_scale: Multiplier of cosine similarities (the model's learned ``logit_scale.exp()``).
    """

    def __init__(self, labels: Sequence[str], positive: np.ndarray, negative: np.ndarray, logit_scale: float = 100.0):
        self.labels = list(labels)
        self.positive = np.asarray(positive, np.float32)
        self.negative = np.asarray(negative, np.float32)
        if self.positive.shape != self.negative.shape or len(self.labels) != len(self.positive):
            raise ValueError(f"{len(self.labels)} labels, positive {self.positive.shape}, negative "
                             f"{self.negative.shape}: shapes must agree")
        self.logit_scale = float(logit_scale)

    @functools.cached_property
    def label_index(self):
        """FAISS index of the positive prompt directions, built on first use (scoring needs no faiss)."""
        from rvl.retrieval import EmbeddingIndex

        return EmbeddingIndex.build(self.positive, np.arange(len(self.labels)), factory="Flat")

    @classmethod
    def from_model(cls, model: Any, labels: Sequence[str] | None = None, prompts: PromptSet | str | Path | None = None,
                   batch_size: int = 256) -> "ZeroShotClassifier":
        """Embed the prompt ensembles of ``labels`` (default: the 14 CheXpert labels) with ``model``'s text tower.

        All sentences go through the text tower in one batched pass (``model.encode_reports``); each label's
        positive and negative sides are the re-normalised means of their sentence embeddings, the same ensembling as
        ``open_clip.build_zero_shot_classifier`` (which cannot take a different template list per label).
        """
        from rvl.retrieval.embed import embed_texts

        prompt_set = prompts if isinstance(prompts, PromptSet) else PromptSet.load(prompts)
        labels = list(labels or CHEXPERT_LABELS)
        sentences, spans = [], []
        for label in labels:
            pos, neg = prompt_set.prompts(label)
            spans.append((len(sentences), len(pos), len(neg)))
            sentences.extend(pos + neg)
        emb = embed_texts(model, sentences, batch_size=batch_size)
        positive = np.stack([_mean_direction(emb[s:s + p]) for s, p, _ in spans])
        negative = np.stack([_mean_direction(emb[s + p:s + p + n]) for s, p, n in spans])
        scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
        return cls(labels, positive, negative, logit_scale=scale)

    def logits(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scaled cosine similarities to the positive and negative directions, each ``(N, L)``."""
        emb = np.asarray(embeddings, np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return self.logit_scale * emb @ self.positive.T, self.logit_scale * emb @ self.negative.T

    def predict_proba(self, embeddings: np.ndarray, across_labels: bool = False) -> np.ndarray:
        """``(N, L)`` probabilities.

        Args:
            embeddings: ``(N, D)`` image / study embeddings.
            across_labels: Softmax of the positive logits across labels (rows sum to 1, one finding per image)
                instead of the per-label positive-vs-negative softmax.
        """
        pos, neg = self.logits(embeddings)
        if across_labels:
            shifted = np.exp(pos - pos.max(axis=1, keepdims=True))
            return shifted / shifted.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-(pos - neg)))  # == softmax([pos, neg])[0]

    def top_labels(self, embeddings: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` labels whose positive prompt is most similar (FAISS search), with their pos/neg probability."""
        _, ids = self.label_index.search(np.asarray(embeddings, np.float32), min(k, len(self.labels)))
        pos, neg = self.logits(embeddings)
        return [[(self.labels[j], float(1.0 / (1.0 + np.exp(neg[i, j] - pos[i, j])))) for j in row if j >= 0]
                for i, row in enumerate(ids)]


def label_matrix(frame: Any, labels: Sequence[str], uncertain: float = 0.5) -> np.ndarray:
    """Label columns as targets for voting: 1 positive, 0 negative or blank, ``uncertain`` for -1."""
    values = frame[list(labels)].to_numpy(dtype=np.float32, na_value=np.nan)
    out = np.where(np.isnan(values), 0.0, values)
    return np.where(out < 0, uncertain, out).astype(np.float32)


def knn_zero_shot(index: Any, queries: np.ndarray, k: int = 20, labels: Sequence[str] | None = None,
                  temperature: float = 0.1, exclude_ids: Any = None, self_ids: np.ndarray | None = None) -> np.ndarray:
    """Similarity-weighted vote of the ``k`` nearest index entries' labels.

    Args:
        index: :class:`rvl.retrieval.EmbeddingIndex` whose metadata has the label columns (e.g. a report index).
        queries: ``(N, D)`` study / image embeddings.
        k: Neighbours that vote.
        labels: Label columns (default: the CheXpert labels).
        temperature: Weight = ``exp(cosine / temperature)``; small = nearest dominate.
        exclude_ids: Index ids that never vote.
        self_ids: ``(N,)`` one id per query that must not vote for that query (its own report, when queries come
            from the indexed collection); -1 = none.

    Returns:
        ``(N, L)`` probabilities (weighted fraction of positive neighbours; uncertain counts 0.5, blank 0).
    """
    labels = list(labels or CHEXPERT_LABELS)
    missing = [c for c in labels if c not in index.metadata]
    if missing:
        raise ValueError(f"index metadata lacks label columns {missing}; build the index from labelled reports")
    targets = label_matrix(index.metadata, labels)
    row_of = {int(i): r for r, i in enumerate(index.metadata.index.to_numpy())}
    scores, ids = index.search(queries, k + (self_ids is not None), excluded_ids=exclude_ids)
    probs = np.zeros((len(ids), len(labels)), np.float32)
    for q, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        valid = row_ids >= 0
        if self_ids is not None:
            valid &= row_ids != self_ids[q]
            valid &= np.cumsum(valid) <= k
        if not valid.any():
            continue
        weights = np.exp((row_scores[valid] - row_scores[valid].max()) / temperature)
        votes = targets[[row_of[int(i)] for i in row_ids[valid]]]
        probs[q] = weights @ votes / weights.sum()
    return probs


# ------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model: an rvl export folder, an unmodified open_clip model (local-dir:DIR or its folder, "
                        "hf-hub:ORG/NAME) or NAME:TAG (open_clip name and pretrained tag, e.g. ViT-B-16:openai)")
    parser.add_argument("--images", nargs="+", required=True, help="radiographs (PNG/JPEG/DICOM)")
    parser.add_argument("--labels", default=None, help="comma-separated labels, CheXpert names or free text "
                        "(e.g. 'Pleural Effusion,left apical pneumothorax'); default: the 14 CheXpert labels")
    parser.add_argument("--prompts", default=None, help="prompt YAML (default: the packaged CheXpert set)")
    parser.add_argument("--study", action="store_true", help="treat the images as the views of ONE study (fused)")
    parser.add_argument("--views", nargs="+", default=None, help="with --study: view position of each image (PA, "
                        "AP, LATERAL, LL); default OTHER")
    parser.add_argument("--across-labels", action="store_true", help="softmax across labels instead of per label")
    parser.add_argument("--knn-index", default=None, help="kNN zero-shot instead of prompts: an index folder whose "
                        "metadata has label columns (rvl index build --kind report); its k nearest reports vote")
    parser.add_argument("-k", "--k", type=int, default=20, dest="k", help="voting neighbours for --knn-index")
    parser.add_argument("--top", type=int, default=None, help="only the K labels whose positive prompt is most "
                        "similar (searched in the FAISS label index; for large label vocabularies)")
    parser.add_argument("--allow-degenerate", action="store_true", help="score images smaller than "
                        f"{MIN_IMAGE_SIDE} px or with every pixel equal (refused by default: not a radiograph)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _load_knn_index(path: str, model_dir: str, model: Any) -> Any:
    from rvl.retrieval import EmbeddingIndex
    from rvl.retrieval.embed import model_fingerprint

    return EmbeddingIndex.load(path, model_fingerprint=model_fingerprint(model_dir, model), dim=model.embed_dim)


def run(args: argparse.Namespace) -> int:
    from rvl.data.io import ImageReadError

    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    min_side = None if args.allow_degenerate else MIN_IMAGE_SIDE
    try:
        from rvl.retrieval.embed import images_to_tensor, load_model, read_square, study_tensors

        model = load_model(args.model, args.device)
        classifier = ZeroShotClassifier.from_model(model, labels, args.prompts) if not args.knn_index else None
        knn_index = _load_knn_index(args.knn_index, args.model, model) if args.knn_index else None
        import torch

        device = next(model.parameters()).device
        with torch.no_grad():
            if args.study:
                if args.views and len(args.views) != len(args.images):
                    raise ValueError(f"--views has {len(args.views)} entries for {len(args.images)} images")
                batch = study_tensors(model, args.images, args.views, max_views=len(args.images), min_side=min_side,
                                      override=DEGENERATE_OVERRIDE)
                emb = model.encode_study(*(batch[k].to(device) for k in ("images", "view_mask", "view_types")))
                names = [" + ".join(args.images)]
            else:
                images = images_to_tensor(model, [read_square(p, model.image_size, min_side, DEGENERATE_OVERRIDE)
                                                  for p in args.images])
                emb = model.encode_image(images.to(device))
                names = list(args.images)
    except (FileNotFoundError, ImageReadError, ValueError) as err:
        print(f"rvl zeroshot: error: {err}", file=sys.stderr)
        return 2
    emb = emb.float().cpu().numpy()
    if knn_index is not None:
        knn_labels = labels or [c for c in CHEXPERT_LABELS if c in knn_index.metadata]
        try:
            probs = knn_zero_shot(knn_index, emb, k=min(args.k, len(knn_index)), labels=knn_labels)
        except ValueError as err:
            print(f"rvl zeroshot: error: {err}", file=sys.stderr)
            return 2
        result = [{"image": n, "probabilities": {lab: round(float(p), 4) for lab, p in zip(knn_labels, row)}}
                  for n, row in zip(names, probs)]
    elif args.top:
        result = [{"image": n, "probabilities": {lab: round(p, 4) for lab, p in top}}
                  for n, top in zip(names, classifier.top_labels(emb, args.top))]
    else:
        probs = classifier.predict_proba(emb, across_labels=args.across_labels)
        result = [{"image": n, "probabilities": {lab: round(float(p), 4) for lab, p in zip(classifier.labels, row)}}
                  for n, row in zip(names, probs)]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    width = max(len(lab) for item in result for lab in item["probabilities"])
    for item in result:
        print(item["image"])
        for lab, p in sorted(item["probabilities"].items(), key=lambda kv: -kv[1]):
            print(f"  {lab:<{width}}  {p:.3f}")
    return 0
