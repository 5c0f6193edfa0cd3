"""Zero-shot findings for every study in a folder of DICOM files (a PACS export), no labels needed.

    python examples/zeroshot_dicom_folder.py MODEL_DIR /data/pacs-export results.csv
    python examples/zeroshot_dicom_folder.py MODEL_DIR /data/pacs-export results.csv \
        --labels "Pleural Effusion,left apical pneumothorax"

MODEL_DIR is a trained model folder (`rvl pretrain` writes OUTPUT_DIR/model; `rvl demo` writes
demo_out/train_multiview/model). The files are grouped into studies by their DICOM tags (PatientID,
StudyInstanceUID, StudyDate, ViewPosition); the views of a study are fused into one study embedding and scored
against positive/negative prompt ensembles (rvl/prompts/chexpert.yaml; free-text labels use the default templates).
For a single file, the command line does the same: `rvl zeroshot --model MODEL_DIR --images a.dcm b.dcm --study`.
"""
import argparse

import pandas as pd
import torch

from rvl.data import read_dicom_folder
from rvl.retrieval.embed import load_model, study_tensors
from rvl.zeroshot import ZeroShotClassifier

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model_dir")
parser.add_argument("dicom_folder")
parser.add_argument("output_csv")
parser.add_argument("--labels", help="comma-separated; default the 14 CheXpert observations")
args = parser.parse_args()

model = load_model(args.model_dir)  # eval mode, on the GPU when there is one
labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
classifier = ZeroShotClassifier.from_model(model, labels)  # prompt embeddings computed once

# One row per study; DICOM pixel data goes through the modality LUT, VOI LUT / window and MONOCHROME1 inversion
# (rvl.data.read_image), so the model sees the image as a radiologist's viewer shows it.
studies = read_dicom_folder(args.dicom_folder)
rows = []
for _, study in studies.iterrows():
    batch = study_tensors(model, study["image_paths"], study["view_positions"], max_views=2)  # frontal first
    with torch.no_grad():
        embedding = model.encode_study(*(batch[k].to(next(model.parameters()).device)
                                         for k in ("images", "view_mask", "view_types")))
    probabilities = classifier.predict_proba(embedding.float().cpu().numpy())[0]
    rows.append({"patient_id": study["patient_id"], "study_id": study["study_id"], "study_date": study["study_date"],
                 "views": "+".join(study["view_positions"]), **dict(zip(classifier.labels, probabilities.round(4)))})

result = pd.DataFrame(rows)
result.to_csv(args.output_csv, index=False)
print(f"{len(result)} studies scored -> {args.output_csv}")
# Probabilities are uncalibrated similarities (a softmax of positive vs negative prompt); rank with them, or pick
# thresholds on a few labelled studies of your own site before reading them as rates.
