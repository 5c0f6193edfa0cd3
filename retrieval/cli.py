"""``rvl index build``: embed a study collection (fused multi-view study embeddings) or its reports into an index.

    rvl index build --model MODEL_DIR --data MANIFEST_OR_CACHE --out DIR [--kind study|report] [--factory F]

Multi-GPU: ``accelerate launch -m rvl index build ...`` shards the studies over the processes; the main process
gathers the embeddings and writes the index (``index.faiss`` + ``metadata.parquet`` + ``index.json``) atomically.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# manifest columns carried into the index metadata (labels are added separately)
METADATA_COLUMNS = ("study_id", "patient_id", "study_date", "split", "image_paths", "view_positions", "report")


def build_index_from_data(model: Any, data: str, kind: str = "study", factory: str | None = None,
                          split: str | None = None, batch_size: int = 32, model_dir: str | None = None,
                          fingerprint: str | None = None, device: str | None = None, label_source: str = "auto",
                          degenerate: str = "refuse"):
    """Embed ``data`` with ``model`` and return an :class:`EmbeddingIndex` (ids = manifest row numbers).

    Metadata per id: study id, patient id, date, split, image paths, views, report and the CheXpert label columns
    (``label_source``: ``"manifest"`` columns, ``"nlp"`` = ``rvl.nlp`` labels of the reports, ``"auto"`` = manifest
    columns when present, else ``rvl.nlp``), which kNN zero-shot votes with.
    ``device="cpu"`` forces the CPU; otherwise Accelerate picks this process's device. Returns ``None`` on
    non-main processes of a multi-process launch. ``degenerate`` (refuse / skip / allow): what to do with a view
    smaller than 32 px or with every pixel equal (see :class:`rvl.data.StudyDataset`).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from torch.utils.data import Subset

    from rvl.constants import CHEXPERT_LABELS
    from rvl.data import StudyDataset
    from rvl.evaluate import _report_labels
    from rvl.retrieval import EmbeddingIndex
    from rvl.retrieval.embed import embed_dataset, embed_texts, model_fingerprint

    if kind not in ("study", "report"):
        raise ValueError(f"--kind must be 'study' or 'report', got {kind!r}")
    accelerator = Accelerator(cpu=device == "cpu")  # one process per GPU under `accelerate launch`
    model = model.to(accelerator.device).eval()
    max_views = int(getattr(model, "rvl_cfg", {}).get("max_views", 2))
    dataset = StudyDataset(data, split=split, max_views=max_views, image_transform=model.preprocess, train=False,
                           degenerate=degenerate if kind == "study" else "allow")
    frame = dataset.frame.reset_index(drop=True)
    with accelerator.split_between_processes(list(range(len(dataset)))) as mine:
        if kind == "study":
            emb = embed_dataset(model, Subset(dataset, mine), batch_size=batch_size, reports=False,
                                desc=f"embedding studies [{accelerator.process_index}]")
            part = (emb["index"].tolist(), emb["study"])
        else:
            part = (list(mine), embed_texts(model, frame["report"].iloc[list(mine)].astype(str).tolist(), batch_size))
    parts = gather_object([part])
    if not accelerator.is_main_process:
        return None
    if dataset.skipped_degenerate:
        logger.warning("left out %d degenerate view(s) (--degenerate skip)", dataset.skipped_degenerate)
    rows = np.concatenate([np.asarray(p[0], np.int64) for p in parts])
    vectors = np.concatenate([p[1] for p in parts])
    rows, first = np.unique(rows, return_index=True)  # a study substituted for an unreadable one appears twice
    vectors = vectors[first]
    meta = frame.iloc[rows][[c for c in METADATA_COLUMNS if c in frame]].reset_index(drop=True)
    labels = _report_labels(frame.iloc[rows].reset_index(drop=True), CHEXPERT_LABELS, label_source)
    meta = meta.assign(**{c: labels[c].to_numpy() for c in CHEXPERT_LABELS})
    for column in ("image_paths", "view_positions"):
        if column in meta:
            meta[column] = meta[column].map(lambda v: [str(x) for x in v])
    extra = {"kind": kind, "data": str(Path(data).absolute()), "split": split, "label_source": label_source,
             "model_dir": str(Path(model_dir).absolute()) if model_dir else None}
    fingerprint = fingerprint or model_fingerprint(model_dir if model_dir else model)
    return EmbeddingIndex.build(vectors, rows, factory=factory, metadata=meta, model_fingerprint=fingerprint,
                                extra=extra)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="embed studies or reports and write an index folder",
                           description="Embed studies (fused multi-view) or reports and write DIR/index.faiss, "
                           "metadata.parquet and index.json.")
    build.add_argument("--model", required=True, help="model folder")
    build.add_argument("--data", required=True, help="manifest or prepared cache")
    build.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    build.add_argument("--kind", choices=("study", "report"), default="study",
                       help="study: fused image embeddings (image->study, study->study, text->study); "
                       "report: report-text embeddings (image->report, kNN zero-shot)")
    build.add_argument("--factory", default=None, help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32 "
                       "(default: chosen by collection size)")
    build.add_argument("--split", default=None, help="index only this split (default: all studies)")
    build.add_argument("--label-source", choices=("auto", "manifest", "nlp"), default="auto",
                       help="label columns stored with each study (kNN voting): the manifest's, rvl.nlp labels of "
                       "the reports, or auto (manifest when present, else rvl.nlp)")
    build.add_argument("--degenerate", choices=("refuse", "skip", "allow"), default="refuse",
                       help="views smaller than 32 px or with every pixel equal: refuse (error naming the file, "
                       "default), skip (leave the view out, counted), allow (index them)")
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--device", default=None, help="torch device for a single process (default: cuda if "
                       "available); multi-GPU: accelerate launch")


def run(args: argparse.Namespace) -> int:
    from rvl.fileio import OutputBusyError, exclusive_output

    out = Path(args.out).absolute()
    try:  # the folder is swapped in whole, so its lock lives beside it: a second build is refused, not interleaved
        with exclusive_output(out.parent / f".{out.name}.lock", f"the index {out}"):
            return _build(args)
    except OutputBusyError as err:
        print(f"rvl index build: error: {err}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    from rvl.data.io import DegenerateImageError
    from rvl.data.manifest import ManifestError
    from rvl.retrieval.embed import load_model, model_fingerprint

    try:
        model = load_model(args.model, args.device or "cpu")  # Accelerate moves it to this process's device
        index = build_index_from_data(model, args.data, args.kind, args.factory, args.split, args.batch_size,
                                      model_dir=args.model, fingerprint=model_fingerprint(args.model),
                                      device=args.device, label_source=args.label_source,
                                      degenerate=args.degenerate)
    except DegenerateImageError as err:
        print(f"rvl index build: error: {err}; pass --degenerate skip to leave such views out, or --degenerate "
              "allow to index them", file=sys.stderr)
        return 2
    except (FileNotFoundError, ManifestError, ValueError) as err:
        print(f"rvl index build: error: {err}", file=sys.stderr)
        return 2
    if index is None:  # non-main accelerate process
        return 0
    out = index.save(args.out)
    print(f"wrote {out}: {len(index)} {args.kind} embeddings, dim {index.dim}, factory {index.factory}"
          f"{' (' + index.search_params + ')' if index.search_params else ''}")
    return 0
