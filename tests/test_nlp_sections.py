"""rvl.nlp.extract_sections: header formats, normalisation, MIMIC-CXR fallbacks."""
from __future__ import annotations

import pytest

from rvl.nlp import extract_sections, select_text


def test_mimic_report_with_wet_read_and_boilerplate():
    report = ("WET READ: ___ ___ 9:41 PM\n  Right lower lobe opacity, possibly pneumonia.\n\n"
              "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
              " INDICATION:  ___ year old man with fever.\n \n COMPARISON:  ___\n \n FINDINGS: \n"
              " Right lower lobe opacity.  No effusion.\n \n IMPRESSION: \n Right lower lobe pneumonia.")
    sections = extract_sections(report)
    assert sections["findings"] == "Right lower lobe opacity.  No effusion."
    assert sections["impression"] == "Right lower lobe pneumonia."
    assert sections["indication"] == "___ year old man with fever."
    assert sections["comparison"] == "___"
    assert sections["technique"] == "CHEST (PA AND LAT)"
    assert "FINAL REPORT" not in " ".join(sections.values())
    assert "possibly pneumonia" in sections["other"]  # the wet read is kept apart, not labelled by default


@pytest.mark.parametrize("report", [
    "FINDINGS: Lungs clear. IMPRESSION: Normal chest.",                 # inline
    "findings: Lungs clear.\nimpression: Normal chest.",                # lower case
    "FINDINGS\nLungs clear.\n\nIMPRESSION\nNormal chest.",              # header alone on its line, no colon
    "Findings : Lungs clear.\r\nConclusion : Normal chest.\r\n",        # space before colon, CRLF, synonym
    "Findings: Lungs clear.\nImpression - Normal chest.",                # dash separator
])
def test_header_formats(report):
    sections = extract_sections(report)
    assert sections["findings"] == "Lungs clear."
    assert sections["impression"] == "Normal chest."


def test_numbered_impression_synonyms_and_typos():
    sections = extract_sections("CLINICAL HISTORY: Cough.\nFINDNGS: Effusion.\nIMPRESSION:\n1. Small effusion.\n"
                                "2. No pneumothorax.\nRECOMMENDATION(S): CT in 3 months.")
    assert sections["indication"] == "Cough."
    assert sections["findings"] == "Effusion."
    assert sections["impression"] == "1. Small effusion.\n2. No pneumothorax."
    assert sections["recommendation"] == "CT in 3 months."


def test_words_that_are_not_headers():
    sections = extract_sections("FINDINGS: The hilum gives the impression of fullness. These findings were "
                                "discussed.\nIMPRESSION: Prominent hilum.")
    assert sections["findings"] == "The hilum gives the impression of fullness. These findings were discussed."
    assert sections["impression"] == "Prominent hilum."


def test_fallback_last_paragraph_is_impression():
    assert extract_sections("No pneumothorax. Heart size normal.") == {
        "impression": "No pneumothorax. Heart size normal."}
    sections = extract_sections("Small effusion. No pneumothorax.\n\nSmall left effusion.")
    assert sections == {"findings": "Small effusion. No pneumothorax.", "impression": "Small left effusion."}
    sections = extract_sections("COMPARISON: ___.\n\nThe lungs are clear. No effusion.")
    assert sections == {"comparison": "___.", "impression": "The lungs are clear. No effusion."}


def test_free_text_after_short_section_becomes_findings():
    sections = extract_sections("INDICATION: Dyspnea.\nCOMPARISON: None.\n\nThe heart size is normal.\n\n"
                                "IMPRESSION: No acute process.")
    assert sections["findings"] == "The heart size is normal."
    assert sections["comparison"] == "None."


def test_addendum_and_deid_placeholders():
    sections = extract_sections("IMPRESSION: Pneumonia.\n\nADDENDUM\nIMPRESSION: XXXX is new.\n"
                                "NOTIFICATION: Discussed with Dr. ___.")
    assert sections["impression"] == "Pneumonia.\nXXXX is new."
    assert "Dr. ___" in sections["other"]


@pytest.mark.parametrize("bad", [None, "", "   \n ", 3.5, b"FINDINGS: x"])
def test_bad_input_gives_empty(bad):
    assert extract_sections(bad) == {}


def test_select_text_order_and_strict():
    report = "INDICATION: r/o pneumonia.\nFINDINGS: Lungs clear.\nIMPRESSION: Normal."
    assert select_text(report, ("impression", "findings")) == "Normal.\n\nLungs clear."
    only_indication = "INDICATION: r/o pneumonia."
    assert select_text(only_indication, ("impression",)) == only_indication
    assert select_text(only_indication, ("impression",), strict=True) == ""
    assert select_text(report, None) == report
