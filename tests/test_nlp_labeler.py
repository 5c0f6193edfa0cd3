"""rvl.nlp.label_reports: each CheXpert rule family on real computation (blank spaCy + rvl components)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from rvl.constants import CHEXPERT_LABELS
from rvl.nlp import build_labeler_pipeline, label_reports

NAN = math.nan


@pytest.fixture(scope="module")
def nlp():
    return build_labeler_pipeline()


def labels(nlp, text: str, sections=None) -> dict[str, float]:
    return label_reports([text], sections=sections, nlp=nlp).iloc[0].to_dict()


def check(row: dict, **expected: float) -> None:
    names = {"NF": "No Finding", "EC": "Enlarged Cardiomediastinum", "CM": "Cardiomegaly", "LO": "Lung Opacity",
             "LL": "Lung Lesion", "ED": "Edema", "CO": "Consolidation", "PN": "Pneumonia", "AT": "Atelectasis",
             "PX": "Pneumothorax", "PE": "Pleural Effusion", "PO": "Pleural Other", "FR": "Fracture",
             "SD": "Support Devices"}
    for short, value in expected.items():
        got = row[names[short]]
        assert (math.isnan(got) and math.isnan(value)) or got == value, f"{names[short]}: {got} != {value}"


def test_columns_and_values(nlp):
    frame = label_reports(["Mild cardiomegaly. No effusion. Possible pneumonia.", "Normal chest."], nlp=nlp)
    assert list(frame.columns) == CHEXPERT_LABELS
    values = frame.to_numpy().ravel()
    assert set(values[~pd.isna(values)]) == {1.0, 0.0, -1.0}
    assert frame.dtypes.eq("float64").all()


@pytest.mark.parametrize("text, expected", [
    ("Mild cardiomegaly.", {"CM": 1.0}),
    ("Left basilar atelectatic changes.", {"AT": 1.0}),
    ("Right lower lobe consolidative opacity.", {"CO": 1.0, "LO": 1.0}),
    ("Nodular opacity in the left lung.", {"LL": 1.0, "LO": 1.0}),     # CheXpert: both categories
    ("Massive pleural effusion.", {"LL": NAN, "PE": 1.0}),              # token boundaries: "massive" is not "mass"
    ("Right PICC tip in the SVC.", {"SD": 1.0}),
    ("Old healed rib fractures.", {"FR": 1.0}),
    ("Small left hydropneumothorax.", {"PX": 1.0, "PE": 1.0}),
])
def test_mentions(nlp, text, expected):
    check(labels(nlp, text), **expected)


@pytest.mark.parametrize("text, expected", [
    ("Small pericardial effusion.", {"PE": NAN}),
    ("Calcified nodule in the right upper lobe.", {"LL": NAN}),
    ("Surgical clips project over the heart.", {"CM": NAN, "SD": 1.0}),
    ("Lucency along the right heart border.", {"CM": NAN}),
    ("Lymph nodes in the mediastinum are calcified.", {"EC": NAN}),
    ("A pleural line is visible at the apex.", {"SD": NAN}),
    ("Left plate-like atelectasis.", {"SD": NAN, "AT": 1.0}),
    ("Patient with heart failure.", {"CM": -1.0, "ED": 1.0}),            # "heart failure" is not a Cardiomegaly mention
])
def test_unmentions(nlp, text, expected):
    check(labels(nlp, text), **expected)


@pytest.mark.parametrize("text, expected", [
    ("No pneumothorax or pleural effusion.", {"PX": 0.0, "PE": 0.0}),
    ("No focal consolidation, pleural effusion, or pneumothorax.", {"CO": 0.0, "PE": 0.0, "PX": 0.0}),
    ("No pneumothorax, but there is a small effusion.", {"PX": 0.0, "PE": 1.0}),   # "but" ends the scope
    ("No pneumothorax. Small effusion.", {"PX": 0.0, "PE": 1.0}),                   # sentence end ends it
    ("No pneumothorax; moderate cardiomegaly.", {"PX": 0.0, "CM": 1.0}),
    ("Pneumothorax is not seen.", {"PX": 0.0}),                                    # backward cue
    ("The heart, pulmonary vasculature and mediastinum are within normal limits.", {"CM": 0.0, "EC": 0.0}),
    ("There is a 1 cm nodule, not seen previously.", {"LL": 1.0}),                 # comma ends a backward scope
    ("Mild cardiomegaly, normal pulmonary vascularity.", {"CM": 1.0}),
    ("Heart size is normal.", {"CM": 0.0}),
    ("Normal heart size and mediastinal contours.", {"CM": 0.0, "EC": 0.0}),
    ("The right chest tube has been removed.", {"SD": 0.0}),
    ("No change in moderate cardiomegaly.", {"CM": 1.0}),                          # pseudo-negation
    ("No focal opacity to suggest pneumonia.", {"LO": 0.0, "PN": 0.0}),           # "no X to suggest Y" negates Y
    ("Resolved pulmonary edema.", {"ED": 0.0}),
])
def test_negation_scope(nlp, text, expected):
    check(labels(nlp, text), **expected)


@pytest.mark.parametrize("text, expected", [
    ("No new focal consolidation.", {"CO": -1.0}),                 # pre-negation uncertainty beats "no"
    ("Cannot exclude a small effusion.", {"PE": -1.0}),
    ("Pneumonia cannot be excluded.", {"PN": -1.0}),
    ("Infection is not excluded.", {"PN": -1.0}),
    ("Atelectasis versus pneumonia.", {"AT": -1.0, "PN": -1.0}),
    ("Opacity may represent atelectasis or pneumonia.", {"LO": 1.0, "AT": -1.0, "PN": -1.0}),
    ("Possible small effusion, no pneumothorax.", {"PE": -1.0, "PX": 0.0}),    # negation precedes post-neg unc.
    ("No pneumothorax, possible small effusion.", {"PX": 0.0, "PE": -1.0}),    # a new hedge ends "no"'s scope
    ("No definite consolidation.", {"CO": 0.0}),
    ("Stable cardiomediastinal silhouette.", {"EC": -1.0}),
    ("Heart size is stable.", {"CM": -1.0}),
    ("Stable moderate cardiomegaly.", {"CM": 1.0}),
    ("Mild pulmonary vascular congestion.", {"ED": -1.0}),                  # always-uncertain Edema phrase
    ("No pulmonary vascular congestion.", {"ED": 0.0}),
    ("Blunting of the left costophrenic angle.", {"PE": -1.0}),
    ("Borderline heart size.", {"CM": -1.0}),
    ("Findings suggest mild edema.", {"ED": -1.0}),
    ("Left lower lobe opacity concerning for pneumonia.", {"LO": 1.0, "PN": -1.0}),
    ("Pneumonia?", {"PN": -1.0}),
])
def test_uncertainty_precedence(nlp, text, expected):
    check(labels(nlp, text), **expected)


@pytest.mark.parametrize("text, expected", [
    ("No effusion. Possible small effusion.", {"PE": -1.0}),        # {0, -1} -> -1
    ("No effusion. Small left effusion.", {"PE": 1.0}),             # {0, 1} -> 1
    ("Possible effusion. Small right effusion.", {"PE": 1.0}),      # {-1, 1} -> 1
])
def test_aggregation(nlp, text, expected):
    check(labels(nlp, text), **expected)


@pytest.mark.parametrize("text, expected", [
    ("No acute cardiopulmonary process.", {"NF": 1.0}),
    ("Endotracheal tube in place. No pneumothorax.", {"NF": 1.0, "SD": 1.0, "PX": 0.0}),  # devices do not block
    ("Possible small effusion.", {"NF": NAN}),                                            # uncertain blocks
    ("Emphysema. No acute process.", {"NF": NAN}),                                        # other abnormality
    ("Mild thoracic scoliosis.", {"NF": NAN}),
    ("No hiatal hernia. Lungs clear.", {"NF": 1.0}),                                      # negated other
    ("Mild cardiomegaly.", {"NF": NAN}),
])
def test_no_finding(nlp, text, expected):
    check(labels(nlp, text), **expected)
    assert label_reports([text], nlp=nlp)["No Finding"].iloc[0] != 0.0  # never 0, as in CheXpert


@pytest.mark.parametrize("text, expected", [
    ("Findings consistent with CHF.", {"ED": 1.0, "CM": -1.0}),
    ("Possible congestive heart failure.", {"ED": -1.0, "CM": -1.0}),
    ("No evidence of CHF.", {"ED": 0.0, "CM": NAN}),
    ("Moderate cardiomegaly with CHF.", {"CM": 1.0}),
    ("Heart size is normal. Mild CHF.", {"CM": -1.0}),              # {0, -1} -> -1
])
def test_chf_rule(nlp, text, expected):
    check(labels(nlp, text), **expected)


def test_sections_are_respected(nlp):
    report = "INDICATION: r/o pneumonia.\nFINDINGS: Small left effusion.\nIMPRESSION: No pneumothorax."
    row = label_reports([report], nlp=nlp).iloc[0]
    assert math.isnan(row["Pneumonia"]) and row["Pleural Effusion"] == 1.0 and row["Pneumothorax"] == 0.0
    whole = label_reports([report], sections=None, nlp=nlp).iloc[0]
    assert whole["Pneumonia"] == 0.0  # "r/o" pneumonia is labelled when the whole report is asked for


def test_evidence(nlp):
    frame = label_reports(["FINDINGS: Cannot exclude pneumonia. No pneumothorax.\nIMPRESSION: CHF."], nlp=nlp,
                          return_evidence=True)
    evidence = frame["evidence"].iloc[0]
    text = evidence["_text"]
    (pneumonia,) = evidence["Pneumonia"]
    assert pneumonia["status"] == "uncertain" and pneumonia["cue"] == "Cannot exclude"
    assert pneumonia["cue_category"] == "pre_negation_uncertainty"
    assert text[pneumonia["start"]:pneumonia["end"]] == "pneumonia"
    (pneumothorax,) = evidence["Pneumothorax"]
    assert (pneumothorax["status"], pneumothorax["cue"]) == ("negative", "No")
    assert "CHF rule" in evidence["Cardiomegaly"][0]["cue"]


def test_bad_input_rows_blank_counted_in_order(nlp):
    texts = ["Mild cardiomegaly.", None, math.nan, 123, b"\xff\xfe", b"Small effusion.", "", "   ",
             "x " * 60_000, "No pneumothorax.", "bad \udcff byte"]
    frame = label_reports(texts, nlp=nlp)
    assert len(frame) == len(texts)
    assert frame["Cardiomegaly"].iloc[0] == 1.0
    assert frame["Pleural Effusion"].iloc[5] == 1.0          # UTF-8 bytes are decoded
    assert frame["Pneumothorax"].iloc[9] == 0.0
    for i in (1, 2, 3, 4, 6, 7, 8, 10):
        assert frame.iloc[i].isna().all(), i
    stats = frame.attrs["stats"]
    assert stats["invalid"] == 8
    counts = (stats["missing"], stats["not_text"], stats["non_utf8"], stats["empty"], stats["too_long"])
    assert counts == (2, 1, 2, 2, 1)


def test_sentence_split_on_paragraphs_and_lists(nlp):
    check(labels(nlp, "1. No pneumothorax\n2. Small effusion"), PX=0.0, PE=1.0)
    check(labels(nlp, "No pneumothorax\n\nSmall effusion"), PX=0.0, PE=1.0)


def test_custom_observation_yaml(tmp_path):
    path = tmp_path / "obs.yaml"
    path.write_text("observations:\n  Pleural Effusion:\n    mention: [effusion]\n  Hernia:\n"
                    "    mention: [hiatal hernia]\n")
    frame = label_reports(["Small effusion. No hiatal hernia."], observations=str(path))
    assert list(frame.columns) == CHEXPERT_LABELS + ["Hernia"]
    assert frame["Pleural Effusion"].iloc[0] == 1.0 and frame["Hernia"].iloc[0] == 0.0
    assert math.isnan(frame["Cardiomegaly"].iloc[0])
    path.write_text("observations:\n  Edema:\n    mention: [edema, no]\n")  # YAML boolean: rejected clearly
    with pytest.raises(ValueError, match="boolean"):
        label_reports(["x"], observations=str(path))


@pytest.mark.parametrize("parallel", ["spacy", "pool"])
def test_n_process_2_matches_single_process(nlp, parallel):
    texts = ["Mild cardiomegaly. No effusion.", None, "Possible pneumonia.", "CHF."] * 10
    single = label_reports(texts, nlp=nlp, return_evidence=True)
    multi = label_reports(texts, nlp=nlp, n_process=2, parallel=parallel, batch_size=4, return_evidence=True)
    assert single.drop(columns="evidence").equals(multi.drop(columns="evidence"))
    assert list(single["evidence"]) == list(multi["evidence"])  # extension values survive the process boundary
    assert multi.attrs["stats"]["invalid"] == 10
