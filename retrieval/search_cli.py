"""``rvl search``: query an index folder with images (one study), a stored study, or a text prompt.

    rvl search --index DIR (--image PATH [PATH ...] | --study-id ID | --text "PROMPT") [-k 5]
               [--exclude-patient ID] [--patient ID --before DATE] [--json]

Image queries are fused into one study embedding; against a study index this is image->study search, against a
report index image->report. ``--study-id`` reuses the stored embedding of a study in a study index (no model needed)
and never returns the study itself. The model comes from ``index.json`` (``extra.model_dir``) unless ``--model`` is
given; an index built by a different model is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from rvl.constants import CHEXPERT_LABELS


def _as_list(value: Any) -> list[str]:
    """A list column value as a list of str (native list / array, or a JSON-encoded list as in CSV manifests)."""
    if isinstance(value, str):
        return [str(v) for v in json.loads(value)] if value.strip().startswith("[") else [value]
    return [str(v) for v in value] if value is not None else []


def _query_vector(args: argparse.Namespace, index: Any) -> tuple[np.ndarray, list[int]]:
    """The query embedding and ids to exclude (the query study itself)."""
    from rvl.retrieval.embed import embed_texts, load_model, model_device, model_fingerprint, study_tensors

    kind = index.extra.get("kind", "study")
    exclude: list[int] = []
    study_row = None
    if args.study_id is not None:
        meta = index.metadata
        matches = meta.index[meta["study_id"].astype(str) == str(args.study_id)] if "study_id" in meta else []
        if len(matches) == 0:
            raise ValueError(f"study id {args.study_id!r} is not in the index")
        exclude = [int(i) for i in matches]
        study_row = meta.loc[matches[0]]
        if kind == "study":  # the stored embedding is the query; no model needed
            return index.reconstruct(np.asarray(exclude[:1], np.int64)), exclude
    model_dir = args.model or index.extra.get("model_dir")
    if not model_dir:
        raise ValueError("the index does not name its model (index.json extra.model_dir); pass --model")
    model = load_model(model_dir, args.device)
    fingerprint = model_fingerprint(model_dir, model)
    if index.model_fingerprint and fingerprint != index.model_fingerprint:
        from rvl.retrieval import IndexMismatchError

        raise IndexMismatchError(f"index {args.index} was built by a different model than {model_dir} "
                                 f"({index.model_fingerprint} vs {fingerprint}); rebuild it with `rvl index build`")
    if model.embed_dim != index.dim:
        raise ValueError(f"model {model_dir} makes {model.embed_dim}-d embeddings, the index holds {index.dim}-d")
    if args.text is not None:
        return embed_texts(model, [args.text]), exclude
    import torch

    if study_row is not None:
        paths = _as_list(study_row["image_paths"])
        views = _as_list(study_row["view_positions"]) if "view_positions" in study_row else None
    else:
        paths, views = list(args.image), args.views
        if views and len(views) != len(paths):
            raise ValueError(f"--views has {len(views)} entries for {len(paths)} images")
    batch = study_tensors(model, paths, views or None, max_views=int(model.rvl_cfg.get("max_views", 2)))
    device = model_device(model)
    with torch.no_grad():
        emb = model.encode_study(*(batch[k].to(device) for k in ("images", "view_mask", "view_types")))
    return emb.float().cpu().numpy(), exclude


def _hit(row: Any, score: float, rank: int) -> dict[str, Any]:
    out = {"rank": rank, "score": round(float(score), 4)}
    for column in ("study_id", "patient_id", "study_date", "split"):
        if column in row:
            out[column] = None if row[column] is None else str(row[column])
    if "image_paths" in row:
        out["image_paths"] = _as_list(row["image_paths"])
    if "report" in row:
        out["report"] = str(row["report"])
    labels = {c: float(row[c]) for c in CHEXPERT_LABELS if c in row and row[c] == row[c]}
    if labels:
        out["labels"] = labels
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder (rvl index build --out)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", nargs="+", help="radiograph(s) of one study (views are fused)")
    query.add_argument("--study-id", help="a study in the index: find similar studies")
    parser.add_argument("--views", nargs="+", default=None, help="view position of each --image (PA, AP, LATERAL, "
                        "LL); default OTHER")
    query.add_argument("--text", help='text prompt, e.g. "large left pleural effusion"')
    parser.add_argument("-k", "--k", type=int, default=5, dest="k", help="results (default 5)")
    parser.add_argument("--exclude-patient", help="leave out this patient's studies")
    parser.add_argument("--patient", help="only this patient's studies (similar prior studies)")
    parser.add_argument("--before", help="only studies dated before YYYY-MM-DD")
    parser.add_argument("--model", default=None,
                        help="model (as for rvl index build; default: the one recorded in index.json)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from rvl.data.io import ImageReadError
    from rvl.retrieval import EmbeddingIndex, filter_ids

    if args.k < 1:
        print("rvl search: error: -k must be >= 1", file=sys.stderr)
        return 2
    try:
        index = EmbeddingIndex.load(args.index)
        query, exclude = _query_vector(args, index)
        allowed, excluded = filter_ids(index.metadata, patient_id=args.patient, before=args.before,
                                       exclude_patient=args.exclude_patient, exclude_ids=exclude or None)
        scores, ids = index.search(query, args.k, allowed_ids=allowed, excluded_ids=excluded)
    except (FileNotFoundError, ImageReadError, ValueError) as err:
        print(f"rvl search: error: {err}", file=sys.stderr)
        return 2
    hits = [_hit(index.metadata.loc[int(i)], s, r + 1) for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]
    if args.json:
        print(json.dumps({"index": str(args.index), "kind": index.extra.get("kind"), "results": hits}, indent=2))
        return 0
    if not hits:
        print("no results (the filters leave no study)")
    for hit in hits:
        report = " ".join(hit.get("report", "").split())
        print(f"{hit['rank']:>3}  {hit['score']:.3f}  study {hit.get('study_id')}  patient {hit.get('patient_id')}  "
              f"{hit.get('study_date', '')}\n     {report[:160]}{'...' if len(report) > 160 else ''}")
    return 0
