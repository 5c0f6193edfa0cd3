"""Sentence-level report sampling: splitting, seeded draws, per-sentence labels, and the batch it produces."""
from __future__ import annotations

import math

import pytest
import torch

from rvl.constants import CHEXPERT_LABELS
from rvl.text_sampling import ReportSentenceSampler, split_sentences

pytest.importorskip("spacy")

REPORT = ("INDICATION: Cough.\n\nFINDINGS: Moderate cardiomegaly. There is no pleural effusion. Right apical mass "
          "measuring 6.9 cm.\n\nIMPRESSION:\n1. Moderate cardiomegaly.\n2. Right apical mass.")
COL = {name: i for i, name in enumerate(CHEXPERT_LABELS)}


def test_split_sentences_keeps_decimals_and_drops_list_numbers():
    assert split_sentences("Moderate cardiomegaly. Mass measuring 6.9 cm.\n1. Small effusion. 2. No pneumothorax.") \
        == ["Moderate cardiomegaly.", "Mass measuring 6.9 cm.", "Small effusion.", "No pneumothorax."]


def test_sampler_draws_report_sentences_under_the_torch_seed():
    never, always = ReportSentenceSampler(0.0), ReportSentenceSampler(1.0)
    assert never.sample(REPORT) is None
    allowed = set(split_sentences("Moderate cardiomegaly. There is no pleural effusion. Right apical mass measuring "
                                  "6.9 cm. Moderate cardiomegaly. Right apical mass."))
    draws = []
    for seed in range(20):
        torch.manual_seed(seed)
        draws.append(always.sample(REPORT))
    assert set(draws) <= allowed and len(set(draws)) >= 3  # findings + impression only, never the indication
    torch.manual_seed(7)
    first = always.sample(REPORT)
    torch.manual_seed(7)
    assert always.sample(REPORT) == first
    assert always.sample("Heart size normal.") is None  # one sentence: keep the report
    with pytest.raises(ValueError):
        ReportSentenceSampler(1.5)


def test_sentence_labels_state_only_what_the_sentence_mentions():
    calls = []

    sampler = ReportSentenceSampler(1.0)
    labels = sampler.label(["There is no pleural effusion.", "Moderate cardiomegaly.", "Clear lungs."])
    assert labels[0, COL["Pleural Effusion"]] == 0 and labels[1, COL["Cardiomegaly"]] == 1
    assert math.isnan(labels[0, COL["Cardiomegaly"]]) and all(math.isnan(v) for v in labels[:, COL["No Finding"]])
    counting = ReportSentenceSampler(1.0, labeler=lambda texts: calls.append(list(texts)) or
                                     [[float("nan")] * len(CHEXPERT_LABELS)] * len(texts))
    counting.label(["a b c d", "e f g h", "a b c d"])
    counting.label(["a b c d"])
    assert calls == [["a b c d", "e f g h"]]  # each distinct sentence is labelled once


def test_collate_gives_sentence_rows_their_own_labels():
    from rvl.train_support import Collate

    def item(i, sentence):
        labels = torch.full((len(CHEXPERT_LABELS),), float("nan"))
        labels[COL["Cardiomegaly"]] = 1.0
        return {"images": torch.zeros(1, 3, 4, 4), "view_mask": torch.ones(1, dtype=torch.bool),
                "view_types": torch.zeros(1, dtype=torch.long), "report": REPORT, "labels": labels, "index": i,
                "sentence": sentence}

    seen = []
    collate = Collate(lambda texts: seen.extend(texts) or torch.zeros(len(texts), 4, dtype=torch.long),
                      ReportSentenceSampler(1.0))
    batch = collate([item(0, None), item(1, "There is no pleural effusion.")])
    assert seen == [REPORT, "There is no pleural effusion."]
    assert batch["text_is_sentence"].tolist() == [False, True]
    assert batch["text_labels"][0, COL["Cardiomegaly"]] == 1  # the report row keeps the study labels
    assert batch["text_labels"][1, COL["Pleural Effusion"]] == 0
    assert math.isnan(float(batch["text_labels"][1, COL["Cardiomegaly"]]))
    assert batch["labels"][1, COL["Cardiomegaly"]] == 1  # the study side is untouched
