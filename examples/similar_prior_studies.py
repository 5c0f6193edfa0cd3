"""Build an archive index of studies and find similar studies: across the archive, and the patient's own priors.

    python examples/similar_prior_studies.py MODEL_DIR data/mimic-cache archive_index STUDY_ID

The same with the command line:
    rvl index build --model MODEL_DIR --data data/mimic-cache --out archive_index --kind study
    rvl search --index archive_index --study-id STUDY_ID -k 5 --exclude-patient PATIENT   # similar cases
    rvl search --index archive_index --study-id STUDY_ID --patient PATIENT --before DATE  # the patient's priors
    rvl search --index archive_index --text "large left pleural effusion" -k 5              # text -> studies
"""
import argparse
import subprocess
import sys

from rvl.retrieval import EmbeddingIndex

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model_dir")
parser.add_argument("data", help="prepared cache or manifest of the archive")
parser.add_argument("index_dir")
parser.add_argument("study_id", help="the query study (must be in the archive)")
parser.add_argument("-k", type=int, default=5)
args = parser.parse_args()

# 1. Embed every study (views fused) once and save a FAISS index with its metadata (patient, date, report, labels).
#    Exact search ("Flat") for small archives, IVF/HNSW chosen by size for large ones; saves are atomic.
subprocess.run([sys.executable, "-m", "rvl", "index", "build", "--model", args.model_dir, "--data", args.data,
                "--out", args.index_dir, "--kind", "study"], check=True)

index = EmbeddingIndex.load(args.index_dir)
meta = index.metadata
query = meta[meta["study_id"].astype(str) == args.study_id]
if query.empty:
    sys.exit(f"study {args.study_id} is not in {args.index_dir}")
query = query.iloc[0]
vector = index.reconstruct([int(query["id"])])

# 2. Similar studies of OTHER patients (a reading aid: "what did similar cases show?").
own = meta.index[meta["patient_id"] == query["patient_id"]].to_numpy()
scores, ids = index.search(vector, args.k, excluded_ids=own)
print(f"query {query['study_id']} ({query['patient_id']}, {query['study_date']})\n{query['report']}\n")
print("similar studies of other patients:")
for score, i in zip(scores[0], ids[0]):
    if i >= 0:
        row = meta.loc[int(i)]
        print(f"  {score:.3f}  {row['study_id']}  {' '.join(str(row['report']).split())[:150]}")

# 3. The same patient's earlier studies, most similar first (e.g. to pick the comparison study for a report).
same_patient = meta["patient_id"] == query["patient_id"]
earlier = meta[same_patient & (meta["study_date"].astype(str) < str(query["study_date"]))]
if len(earlier):
    scores, ids = index.search(vector, args.k, allowed_ids=earlier.index.to_numpy())
    print("\nthe patient's prior studies, most similar first:")
    for score, i in zip(scores[0], ids[0]):
        if i >= 0:
            print(f"  {score:.3f}  {meta.loc[int(i), 'study_id']}  {meta.loc[int(i), 'study_date']}")
