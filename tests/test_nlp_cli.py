"""`rvl label` end to end: CSV / Parquet / JSONL / headerless CSV, streaming, bad input."""
from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rvl.cli import main
from rvl.constants import CHEXPERT_LABELS

REPORTS = [
    "FINDINGS: No pneumothorax.\nIMPRESSION: Small left effusion, possible pneumonia.",
    "Normal chest.",
    'Atelectasis, "quoted", no effusion',
    "",
    "INDICATION: r/o pneumonia.\nIMPRESSION: No acute process.",
]


def _check_labels(frame: pd.DataFrame) -> None:
    assert len(frame) == len(REPORTS)
    effusion = frame["Pleural Effusion"]
    assert effusion.iloc[0] == 1.0 and math.isnan(effusion.iloc[1]) and effusion.iloc[2] == 0.0
    assert frame["Pneumonia"].iloc[0] == -1.0 and frame["No Finding"].iloc[1] == 1.0
    assert frame[CHEXPERT_LABELS].iloc[3].isna().all()                     # empty report: blank row, kept
    assert math.isnan(frame["Pneumonia"].iloc[4])                           # indication is not labelled


def test_csv_with_ids_evidence_sections_and_chunks(tmp_path, capsys):
    source = tmp_path / "reports.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_id", "report", "other"])
        writer.writerows([[f"s{i}", r, "x"] for i, r in enumerate(REPORTS)])
    assert main(["label", str(source), "--id-column", "study_id", "--evidence", "--write-sections",
                 "--chunk-size", "2", "--no-progress"]) == 0
    out = pd.read_csv(tmp_path / "reports.labels.csv", keep_default_na=False, na_values=[""])
    assert list(out.columns[:2]) == ["study_id", "report"] and out["study_id"].tolist() == [f"s{i}" for i in range(5)]
    assert out["other"].tolist() == ["x"] * 5  # every input column passes through
    assert list(out.columns[3:17]) == CHEXPERT_LABELS
    _check_labels(out)
    evidence = json.loads(out["evidence"].iloc[0])
    assert evidence["Pneumonia"][0]["cue"] == "possible"
    assert out["section_findings"].iloc[0] == "No pneumothorax."
    assert "1 invalid reports" in capsys.readouterr().out


def test_headerless_chexpert_style_csv_to_parquet(tmp_path):
    source = tmp_path / "impressions.csv"
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([[r] for r in REPORTS])
    output = tmp_path / "out.parquet"
    assert main(["label", str(source), "-o", str(output), "--no-progress"]) == 0
    out = pd.read_parquet(output)
    assert out["report"].tolist()[1] == "Normal chest."
    _check_labels(out)


def test_parquet_streams_record_batches(tmp_path):
    source = tmp_path / "reports.parquet"
    pq.write_table(pa.table({"id": list(range(len(REPORTS))), "text": REPORTS}), source, row_group_size=2)
    assert main(["label", str(source), "--text-column", "text", "--id-column", "id", "--chunk-size", "2",
                 "--no-progress"]) == 0
    out = pd.read_parquet(tmp_path / "reports.labels.parquet")
    assert out["id"].tolist() == [0, 1, 2, 3, 4]  # input types kept, so the labels join back by key
    _check_labels(out)


def test_jsonl_with_broken_lines_and_non_utf8(tmp_path, capsys):
    source = tmp_path / "reports.jsonl"
    with open(source, "wb") as f:
        for r in REPORTS:
            f.write((json.dumps({"report": r}) + "\n").encode())
        f.write(b'{"report": "bad \xff byte, effusion"}\n')
        f.write(b"not json at all\n")
        f.write(b'{"report": 42}\n')
        f.write(b'{"report": "' + b"edema " * 20_000 + b'"}\n')
    assert main(["label", str(source), "--workers", "2", "--no-progress"]) == 0
    out = pd.read_csv(tmp_path / "reports.labels.csv", keep_default_na=False, na_values=[""])
    assert len(out) == len(REPORTS) + 4                                      # nothing dropped, order kept
    assert out[CHEXPERT_LABELS].iloc[len(REPORTS):].isna().all().all()
    assert "\ufffd" in out["report"].iloc[len(REPORTS)]                      # undecodable byte written safely
    printed = capsys.readouterr().out
    assert "5 invalid reports" in printed and "'non_utf8': 1" in printed and "'too_long': 1" in printed


@pytest.mark.parametrize("args, message", [
    (["missing.csv"], "input file not found"),
    (["{csv}", "--text-column", "nope"], "text column 'nope' not found"),
    (["{csv}", "--id-column", "nope"], "column 'nope' not found"),
    (["{csv}", "--sections", "impression,bogus"], "unknown section 'bogus'"),
    (["{csv}", "-o", "{dir}/out.xlsx"], "output must end in .csv or .parquet"),
    (["{dir}/reports.txt.bak"], "unknown input type"),
])
def test_bad_input_exit_2_one_line(tmp_path, capsys, args, message):
    source = tmp_path / "reports.csv"
    source.write_text("id,report,extra\n1,No effusion.,x\n")
    (tmp_path / "reports.txt.bak").write_text("x")
    argv = ["label"] + [a.format(csv=source, dir=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_jsonl_key_and_parquet_column(tmp_path, capsys):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "x"}\n')
    assert main(["label", str(jsonl)]) == 2
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x"]}), parquet)
    assert main(["label", str(parquet)]) == 2
    assert "not" in capsys.readouterr().err


def test_every_input_column_is_kept_by_default_and_keep_columns_chooses(tmp_path):
    source = tmp_path / "reports.csv"
    pd.DataFrame({"accession": ["A1", "A2"], "patient": ["P9", "P8"],
                  "report": ["IMPRESSION: Large right pleural effusion.", "IMPRESSION: No pneumothorax."],
                  "extra": ["x", "y"]}).to_csv(source, index=False)
    assert main(["label", str(source), "--no-progress"]) == 0
    out = pd.read_csv(tmp_path / "reports.labels.csv", keep_default_na=False, na_values=[""])
    assert list(out.columns[:4]) == ["accession", "patient", "report", "extra"]
    assert list(out["accession"]) == ["A1", "A2"] and out["Pleural Effusion"].iloc[0] == 1.0
    assert main(["label", str(source), "--keep-columns", "patient", "-o", str(tmp_path / "b.csv"),
                 "--no-progress"]) == 0
    assert list(pd.read_csv(tmp_path / "b.csv").columns[:2]) == ["patient", "report"]
    assert main(["label", str(source), "--keep-columns", "none", "-o", str(tmp_path / "c.csv"), "--no-progress"]) == 0
    assert list(pd.read_csv(tmp_path / "c.csv").columns[:2]) == ["report", CHEXPERT_LABELS[0]]
    assert main(["label", str(source), "--keep-columns", "nope", "-o", str(tmp_path / "d.csv"), "--no-progress"]) == 2
    clash = tmp_path / "clash.csv"
    pd.DataFrame({"report": ["Mild cardiomegaly."], "Cardiomegaly": [1]}).to_csv(clash, index=False)
    assert main(["label", str(clash), "--no-progress"]) == 2
