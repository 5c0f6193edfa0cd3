"""Convert MIMIC-CXR-JPG or IU X-ray (Open-i) into the rvl study manifest, then build the image cache.

    # MIMIC-CXR-JPG: the folder with mimic-cxr-2.0.0-metadata.csv.gz and files/pXX/... (+ the reports from
    # mimic-cxr-reports.zip unpacked into the same files/ tree, or give --reports-dir)
    python examples/convert_to_manifest.py mimic /data/mimic-cxr-jpg data/mimic
    # IU X-ray: the folder with indiana_reports.csv, indiana_projections.csv and images/
    python examples/convert_to_manifest.py iu /data/iu-xray data/iu
    rvl prepare data/mimic/manifest.parquet --out data/mimic-cache --size 224

One row per study: patient, study, date, the image paths with their view positions, the report text, and the 14
CheXpert labels (MIMIC's own CheXpert labels when present, else blank: label the reports with `rvl label`).
"""
import argparse

from rvl.data import read_manifest
from rvl.data.manifest import assign_splits, write_manifest  # noqa: F401  (assign_splits: see below)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("format", choices=["mimic", "iu"])
parser.add_argument("root", help="dataset folder as downloaded")
parser.add_argument("out", help="folder for manifest.parquet + manifest.csv")
parser.add_argument("--reports-dir", help="MIMIC only: where files/pXX/pSUBJECT/sSTUDY.txt live (default: root)")
args = parser.parse_args()

kwargs = {"reports_dir": args.reports_dir} if args.format == "mimic" and args.reports_dir else {}
frame = read_manifest(args.root, format=args.format, **kwargs)

# Splits are by patient, never by study, or one person's images end up in both train and test. The converters keep
# MIMIC's official split and give IU X-ray (which has none) a stable 80/10/10 split by patient
# (rvl.data.manifest.assign_splits); re-assign here if you want other fractions:
#   frame["split"] = assign_splits(frame["patient_id"], fractions=(0.7, 0.1, 0.2))
write_manifest(frame, args.out)
print(frame.groupby("split").agg(studies=("study_id", "size"), patients=("patient_id", "nunique")).to_string())
print(f"views per study: {frame['image_paths'].map(len).value_counts().sort_index().to_dict()}")
print(f"-> {args.out}/manifest.parquet")
