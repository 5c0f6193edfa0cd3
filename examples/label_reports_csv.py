"""Label a CSV of free-text radiology reports with the 14 CheXpert observations.

    python examples/label_reports_csv.py reports.csv labels.csv --text-column report_text

Same as the command line `rvl label reports.csv --output labels.csv --text-column report_text`, shown here through the
Python API so you can put the labels next to your own columns. Values follow CheXpert: 1 positive, 0 negative,
-1 uncertain, blank not mentioned.
"""
import argparse

import pandas as pd

from rvl.nlp import label_reports

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("reports_csv")
parser.add_argument("output_csv")
parser.add_argument("--text-column", default="report")
args = parser.parse_args()

reports = pd.read_csv(args.reports_csv)
if args.text_column not in reports:
    raise SystemExit(f"{args.reports_csv}: no column {args.text_column!r} (columns: {', '.join(reports.columns)})")

# Impression first, then findings (CheXpert's convention); empty or non-text reports give an all-blank row, so the
# output always has one row per input row, in order.
labels = label_reports(reports[args.text_column].tolist(), sections=("impression", "findings"))
out = pd.concat([reports.reset_index(drop=True), labels.reset_index(drop=True)], axis=1)
out.to_csv(args.output_csv, index=False)

print(f"{len(out)} reports labelled -> {args.output_csv}")
print("positives per observation:")
print((labels == 1.0).sum().sort_values(ascending=False).to_string())
