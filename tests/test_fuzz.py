"""The fuzzed front door (fast subset; ``bench/fault_matrix.py`` runs the full corpus): every bad input is refused
with a message naming the file or row, or skipped and counted; odd-but-valid inputs work; never a traceback."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rvl.bad_inputs import image_cases, manifest_cases, report_cases
from rvl.bad_inputs_run import run_case, run_prepare_batch
from rvl.constants import CHEXPERT_LABELS
from rvl.data.schema import ManifestError, finalize_manifest


def failures(results: dict[str, object]) -> dict[str, str]:
    return {name: f"{o.verdict}: {o.message[-400:]}" for name, o in results.items() if not o.ok}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_cases(tmp_path_factory.mktemp("images"))


def test_every_bad_image_is_refused_by_the_reader_naming_it(images, tmp_path):
    results = {c.name: run_case(c, "read", tmp_path) for c in images}
    assert not failures(results)
    assert sum(o.verdict == "refused" for o in results.values()) >= 20


def test_prepare_skips_and_lists_every_bad_image(images, tmp_path):
    results = run_prepare_batch(images, tmp_path)
    assert not failures(results)
    assert {name for name, o in results.items() if o.verdict == "skipped"} == \
        {c.name for c in images if c.expect == "error"}


@pytest.mark.parametrize("name", ["zero.png", "bomb.dcm", "bomb.png", "wrong_syntax.dcm"])
def test_prepare_strict_stops_at_the_bad_image(images, tmp_path, name):
    case = next(c for c in images if c.path.name == name)
    assert run_case(case, "prepare-strict", tmp_path).verdict == "refused"


def test_zeroshot_refuses_bad_and_degenerate_images_and_scores_odd_valid_ones(images, tmp_path):
    from rvl.model import create_model

    model_dir = create_model("rvl-tiny").save_pretrained(tmp_path / "model")
    picked = [c for c in images if c.path.name in ("zero.png", "random0.jpg", "bomb.dcm", "one_pixel.dcm",
                                                   "flat.dcm", "multi_frame.dcm", "rgb.dcm", "folder.png")]
    results = {c.name: run_case(c, "zeroshot", tmp_path, model_dir) for c in picked}
    assert not failures(results) and len(results) == 8
    assert results["image:rgb.dcm"].verdict == "accepted"


def test_every_bad_manifest_is_refused_naming_file_or_row(tmp_path):
    cases = manifest_cases(tmp_path / "manifests")
    results = {c.name: run_case(c, "prepare", tmp_path / c.path.stem) for c in cases}
    assert not failures(results)


def test_report_files_label_every_record_or_are_refused(tmp_path):
    cases = report_cases(tmp_path / "reports")
    results = {c.name: run_case(c, "label", tmp_path / "out") for c in cases}
    assert not failures(results)
    assert results["reports:utf16_bom.csv"].extra["rows"] == 3  # decoded, not read as UTF-8 garbage


# ------------------------------------------------------------------------------------------------ property-based
cell = st.one_of(st.none(), st.text(max_size=8), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                 st.lists(st.text(max_size=4), max_size=2), st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({}, optional={"patient_id": cell, "study_id": cell, "image_paths": cell,
                                                         "view_positions": cell, "report": cell, "split": cell,
                                                         "study_date": cell, "Edema": cell}), min_size=1, max_size=4))
def test_any_manifest_rows_give_a_valid_frame_or_a_manifest_error(rows, tmp_path):
    try:
        frame = finalize_manifest(pd.DataFrame(rows), base_dir=tmp_path, origin="m.parquet")
    except ManifestError as err:
        assert str(err).startswith("m.parquet: ")
        return
    assert frame["study_id"].is_unique and all(isinstance(p, list) and p for p in frame["image_paths"])
    assert set(np.unique(frame[CHEXPERT_LABELS].to_numpy()[~np.isnan(frame[CHEXPERT_LABELS].to_numpy())])) <= \
        {-1.0, 0.0, 1.0}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=cell)
def test_a_label_value_is_kept_only_when_it_is_1_0_minus_1_or_blank(value, tmp_path):
    frame = pd.DataFrame({"patient_id": ["p"], "study_id": ["s"], "image_paths": [["a.png"]], "Edema": [value]})
    blank = value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))
    try:  # text must be an ASCII number (pandas, like a CSV reader, does not parse other digits)
        number = None if isinstance(value, list) or blank or (isinstance(value, str) and not value.isascii()) \
            else float(value)
    except ValueError:
        number = None
    valid = blank or number in (1.0, 0.0, -1.0)
    if valid:
        result = finalize_manifest(frame, base_dir=tmp_path, origin="m")["Edema"].iloc[0]
        assert (math.isnan(result) if blank else result == number)
    else:
        with pytest.raises(ManifestError, match="row 0"):
            finalize_manifest(frame, base_dir=tmp_path, origin="m")


@pytest.fixture(scope="module")
def labeler():
    from rvl.nlp.labeler import build_labeler_pipeline

    return build_labeler_pipeline()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.one_of(st.text(max_size=200), st.sampled_from(["\x00", "", "   ", "no effusion\x00",
                                                                        "IMPRESSION:"])), min_size=1, max_size=6))
def test_any_report_text_gets_one_row_of_valid_labels(texts, labeler):
    from rvl.nlp.labeler import iter_labels

    rows = [row for row, _ in iter_labels(texts, None, nlp=labeler)]
    assert len(rows) == len(texts)
    for row in rows:
        values = list(row.values())
        assert len(values) == 14 and all(v is None or (isinstance(v, float) and (math.isnan(v) or v in (1, 0, -1)))
                                         for v in values)
