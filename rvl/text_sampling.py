"""Sentence-level report sampling for training: the text of a pair is sometimes one sentence of its report.

Why: a zero-shot prompt ("pleural effusion", "no pneumothorax") is one short sentence, while a report is a dozen of
them, most of them negations. Trained on whole reports only, a from-scratch text tower maps a prompt and its negation
to nearly the same point (both differ from a report by the same "no"); trained also on single report sentences, it
has to tell "No pleural effusion." from "Small left pleural effusion." to find the right study. Each sampled
sentence is labelled by ``rvl.nlp`` (cached per sentence), so the label-aware targets know what it states: a sentence
matches every study whose labels agree with the findings it mentions, and says nothing about the others (MedCLIP's
sentence-label matching). A whole report keeps the CheXpert reading: a finding it does not mention is absent.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from rvl.constants import CHEXPERT_LABELS

__all__ = ["ReportSentenceSampler", "split_sentences"]

# sentence ends, and "1." / "2." list markers of numbered impressions (not decimals such as "6.9 cm")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;])\s+|\n+|\s*(?<!\S)\d{1,2}[.)]\s+")
_MIN_CHARS = 4
_NO_FINDING = CHEXPERT_LABELS.index("No Finding")


def split_sentences(text: str) -> list[str]:
    """Sentences of a report text (the sections the text tower reads), without list numbers and empty pieces."""
    return [piece.strip() for piece in _SENTENCE_BREAK.split(text) if piece and len(piece.strip()) >= _MIN_CHARS]


class ReportSentenceSampler:
    """Replaces a training report by one of its sentences with probability ``probability``.

    Args:
        probability: Chance that a pair's text is one random sentence of the report's findings/impression instead
            of the whole text. 0 switches sampling off.
        labeler: ``list[str] -> (n, 14)`` CheXpert values (1/0/-1/NaN); default ``rvl.nlp.label_reports``.

    The draw uses torch's global RNG, so under ``SeededStudies`` it is fixed by (seed, epoch, index) and a resumed
    run samples the same sentences.
    """

    def __init__(self, probability: float, labeler=None):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"sentence sampling probability must be in [0, 1], got {probability}")
        self.probability = float(probability)
        self._labeler = labeler
        self._cache: dict[str, np.ndarray] = {}

    def sample(self, report: str) -> str | None:
        """One sentence of ``report`` (findings + impression), or None to keep the whole report."""
        if self.probability <= 0 or float(torch.rand(())) >= self.probability:
            return None
        from rvl.model import report_text_for_model

        sentences = split_sentences(report_text_for_model(report))
        if len(sentences) < 2:  # nothing to choose: the sentence is the report
            return None
        return sentences[int(torch.randint(len(sentences), ()))]

    def label(self, sentences: Sequence[str]) -> np.ndarray:
        """CheXpert values of single sentences ``(n, 14)``; "No Finding" stays blank (a whole-report judgement)."""
        missing = sorted({s for s in sentences if s not in self._cache})
        if missing:
            if self._labeler is None:
                from rvl.nlp import label_reports

                self._labeler = lambda texts: label_reports(texts, sections=None)[CHEXPERT_LABELS].to_numpy(
                    dtype=np.float32, na_value=np.nan)
            values = np.array(self._labeler(missing), dtype=np.float32)
            values[:, _NO_FINDING] = np.nan
            self._cache.update(zip(missing, values))
        return np.stack([self._cache[s] for s in sentences]) if sentences else np.zeros((0, len(CHEXPERT_LABELS)),
                                                                                        np.float32)
