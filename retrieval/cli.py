"""``rvl index``: build an index of study (fused multi-view) or report embeddings; remove studies; compact.

    rvl index build --model MODEL_DIR --data MANIFEST_OR_CACHE --out DIR [--kind study|report] [--factory F]
                    [--target-recall 0.95] [--build-budget 300] [--max-bytes-per-vector B]
    rvl index remove --index DIR (--study-id ID ... | --patient ID ...)     # withdraw studies (never returned again)
    rvl index compact --index DIR                                          # drop removed vectors for good

Without ``--factory`` the index is chosen by measurement (``rvl.retrieval.choose``): the fastest candidate reaching the
target recall@10 on held-out queries, never one slower than exact search; the choice is printed and kept in
``index.json``.

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


def _header_extra(kind: str, data: str, split: str | None, label_source: str, model_dir: str | None) -> dict:
    """What ``index.json`` records about the embeddings (``rvl search`` finds the model through ``model_dir``)."""
    return {"kind": kind, "data": str(Path(data).absolute()), "split": split, "label_source": label_source,
            "model_dir": _model_source(model_dir) if model_dir else None}


def _metadata_rows(frame: Any, rows: np.ndarray, label_source: str) -> Any:
    """Index metadata of manifest ``rows``: the :data:`METADATA_COLUMNS` present plus the CheXpert label columns."""
    from rvl.constants import CHEXPERT_LABELS
    from rvl.evaluate import _report_labels

    meta = frame.iloc[rows][[c for c in METADATA_COLUMNS if c in frame]].reset_index(drop=True)
    labels = _report_labels(frame.iloc[rows].reset_index(drop=True), CHEXPERT_LABELS, label_source)
    meta = meta.assign(**{c: labels[c].to_numpy() for c in CHEXPERT_LABELS})
    for column in ("image_paths", "view_positions"):
        if column in meta:
            meta[column] = meta[column].map(lambda v: [str(x) for x in v])
    return meta


def build_on_disk_index_from_data(model: Any, data: str, out: str, kind: str = "study", factory: str | None = None,
                                  split: str | None = None, batch_size: int = 32, chunk: int = 8192,
                                  label_source: str = "auto", target_recall: float = 0.95,
                                  extra: dict[str, Any] | None = None, fingerprint: str | None = None):
    """Archives past RAM: embed ``data`` chunk by chunk into an IVF index whose inverted lists stay on disk.

    A training sample (64 studies per list) is embedded first to train the index; then ``chunk`` studies at a time
    are embedded and added (``rvl.retrieval.archive.build_on_disk_index``), so only one chunk of embeddings is ever
    in memory. ``factory`` must be IVF (default: ``IVF{≈4·√n}[_HNSW32],SQ8``, 8-bit codes). One process.
    """
    from torch.utils.data import Subset

    from rvl.data import StudyDataset
    from rvl.retrieval.archive import build_on_disk_index
    from rvl.retrieval.choose import TRAIN_POINTS_PER_LIST, ivf_factory
    from rvl.retrieval.embed import embed_dataset, embed_texts

    max_views = int(getattr(model, "rvl_cfg", {}).get("max_views", 2))
    dataset = StudyDataset(data, split=split, max_views=max_views, image_transform=model.preprocess, train=False)
    frame = dataset.frame.reset_index(drop=True)
    n = len(frame)
    factory = factory or ivf_factory(max(16, 2 ** int(round(np.log2(4 * np.sqrt(n))))), "SQ8")

    def embed(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if kind == "report":
            return rows, embed_texts(model, frame["report"].iloc[rows].astype(str).tolist(), batch_size)
        emb = embed_dataset(model, Subset(dataset, rows.tolist()), batch_size=batch_size, reports=False,
                            desc="embedding studies")
        return emb["index"].astype(np.int64), emb["study"]

    n_lists = int(factory.split(",")[0].split("_")[0][3:]) if factory.startswith("IVF") else 1
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, TRAIN_POINTS_PER_LIST * n_lists), replace=False))
    train_vectors = embed(sample)[1]

    def batches():
        seen = np.zeros(n, bool)  # a study substituted for an unreadable one must not come twice
        for start in range(0, n, chunk):
            rows, vectors = embed(np.arange(start, min(n, start + chunk)))
            rows, first = np.unique(rows, return_index=True)
            fresh = ~seen[rows]
            seen[rows] = True
            yield vectors[first][fresh], rows[fresh], _metadata_rows(frame, rows[fresh], label_source)
    return build_on_disk_index(batches(), out, factory, train_vectors, model_fingerprint=fingerprint,
                               extra=extra, target_recall=target_recall)


def build_index_from_data(model: Any, data: str, kind: str = "study", factory: str | None = None,
                          split: str | None = None, batch_size: int = 32, model_dir: str | None = None,
                          fingerprint: str | None = None, device: str | None = None, label_source: str = "auto",
                          degenerate: str = "refuse", **build_options: Any):
    """Embed ``data`` with ``model`` and return an :class:`EmbeddingIndex` (ids = manifest row numbers).

    Metadata per id: study id, patient id, date, split, image paths, views, report and the CheXpert label columns
    (``label_source``: ``"manifest"`` columns, ``"nlp"`` = ``rvl.nlp`` labels of the reports, ``"auto"`` = manifest
    columns when present, else ``rvl.nlp``), which kNN zero-shot votes with.
    ``device="cpu"`` forces the CPU; otherwise Accelerate picks this process's device. Returns ``None`` on
    non-main processes of a multi-process launch. ``degenerate`` (refuse / skip / allow): what to do with a view
    smaller than 32 px or with every pixel equal (see :class:`rvl.data.StudyDataset`). ``build_options`` go to
    :meth:`EmbeddingIndex.build` (``target_recall``, ``budget_s``, ``max_bytes_per_vector``).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from torch.utils.data import Subset

    from rvl.data import StudyDataset
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
    meta = _metadata_rows(frame, rows, label_source)
    extra = _header_extra(kind, data, split, label_source, model_dir)
    fingerprint = fingerprint or model_fingerprint(model_dir if model_dir else model)
    return EmbeddingIndex.build(vectors, rows, factory=factory, metadata=meta, model_fingerprint=fingerprint,
                                extra=extra, **build_options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="embed studies or reports and write an index folder",
                           description="Embed studies (fused multi-view) or reports and write DIR/index.faiss, "
                           "metadata.parquet and index.json.")
    build.add_argument("--model", required=True,
                        help="model: an rvl export folder, an unmodified open_clip model (local-dir:DIR or its folder, "
                        "hf-hub:ORG/NAME) or NAME:TAG (open_clip name and pretrained tag, e.g. ViT-B-16:openai)")
    build.add_argument("--data", required=True, help="manifest or prepared cache")
    build.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    build.add_argument("--kind", choices=("study", "report"), default="study",
                       help="study: fused image embeddings (image->study, study->study, text->study); "
                       "report: report-text embeddings (image->report, kNN zero-shot)")
    build.add_argument("--factory", default=None, help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32 "
                       "(default: the fastest candidate reaching --target-recall, measured; never slower than exact)")
    build.add_argument("--target-recall", type=float, default=0.95, help="recall@10 vs exact search the index is "
                       "tuned to, on held-out queries (default 0.95)")
    build.add_argument("--build-budget", type=float, default=None, help="seconds for measuring candidates; ones "
                       "that would overrun are skipped (default: rvl.retrieval.choose.DEFAULT_BUDGET_S, 300)")
    build.add_argument("--max-bytes-per-vector", type=float, default=None, help="leave out candidates needing more "
                       "memory per vector (e.g. 300 for 1M x 256 in 300 MB)")
    build.add_argument("--split", default=None, help="index only this split (default: all studies)")
    build.add_argument("--label-source", choices=("auto", "manifest", "nlp"), default="auto",
                       help="label columns stored with each study (kNN voting): the manifest's, rvl.nlp labels of "
                       "the reports, or auto (manifest when present, else rvl.nlp)")
    build.add_argument("--degenerate", choices=("refuse", "skip", "allow"), default="refuse",
                       help="views smaller than 32 px or with every pixel equal: refuse (error naming the file, "
                       "default), skip (leave the view out, counted), allow (index them)")
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--on-disk", action="store_true", help="archives past RAM: embed and add chunk by chunk into "
                       "an IVF index whose inverted lists stay on disk (DIR/index.ivfdata, memory-mapped); --factory "
                       "must be IVF (default IVF{~4 sqrt(n)},SQ8); one process")
    build.add_argument("--chunk", type=int, default=8192, help="studies embedded per chunk with --on-disk")
    build.add_argument("--device", default=None, help="torch device for a single process (default: cuda if "
                       "available); multi-GPU: accelerate launch")
    remove = sub.add_parser("remove", help="remove studies from an index folder (they are never returned again)",
                            description="Remove studies by study id or patient id and save the folder atomically.")
    remove.add_argument("--index", required=True, help="index folder")
    remove.add_argument("--study-id", nargs="+", default=[], help="study ids to remove")
    remove.add_argument("--patient", nargs="+", default=[], help="remove every study of these patients")
    compact = sub.add_parser("compact", help="drop the vectors of removed studies for good (rebuilds HNSW graphs)")
    compact.add_argument("--index", required=True, help="index folder")


def describe(index: Any) -> str:
    """One paragraph for the terminal: the index kind, how it was chosen, its recall, speed-up, memory, build time."""
    choice = index.choice or {}
    lines = [f"{len(index)} vectors, dim {index.dim}, factory {index.factory}"
             f"{' (' + index.search_params + ')' if index.search_params else ''}, "
             f"{index.bytes_per_vector():.0f} bytes/vector, built in {choice.get('build_s', float('nan')):.1f} s"]
    if choice.get("method") == "measured":
        lines.append(f"chosen by measurement on {choice['held_out_queries']} held-out queries: recall@{choice['k']} "
                     f"{choice['recall']:.3f}, {choice['speedup']:.1f}x exact search ({choice['qps']:,.0f} vs "
                     f"{choice['exact_qps']:,.0f} queries/s)")
        for row in choice["candidates"][1:]:
            measured = (f"recall {row['recall']:.3f} at {row['speedup']:.1f}x, {row['build_s']:.1f} s"
                        if row["recall"] is not None else "")
            lines.append(f"  {row['factory']:<28} {row['search_params'] or '':<34} {measured}  [{row['status']}]")
    elif choice.get("method"):
        method = {"exact below measuring size": f"exact search: fewer than {choice.get('min_vectors', 0):,} vectors, "
                  "nothing measured", "given": "factory given"}.get(choice["method"], choice["method"])
        tuned = choice.get("recall_queries")
        lines.append(method + (f", tuned to recall@10 {choice['recall']:.3f} on {tuned}" if tuned else ""))
    return "\n".join(lines)


def _edit(args: argparse.Namespace) -> int:
    """``remove`` / ``compact``: load, change, save atomically."""
    from rvl.retrieval import EmbeddingIndex

    index = EmbeddingIndex.load(args.index)
    if args.index_command == "compact":
        dropped = index.compact()
        index.save(args.index)
        print(f"compacted {args.index}: dropped {dropped} removed vectors, {len(index)} remain")
        return 0
    if not args.study_id and not args.patient:
        raise ValueError("give --study-id and/or --patient")
    meta = index.metadata
    chosen = np.zeros(len(meta), bool)
    for column, wanted in (("study_id", args.study_id), ("patient_id", args.patient)):
        if wanted:
            if column not in meta:
                raise ValueError(f"the index metadata has no {column!r} column")
            chosen |= meta[column].astype(str).isin([str(w) for w in wanted]).to_numpy()
    removed = index.remove_ids(meta.index[chosen].to_numpy(np.int64))
    index.save(args.index)
    print(f"removed {removed} studies from {args.index}; {len(index)} remain"
          + (f" ({len(index.removed_ids)} hidden until `rvl index compact`)" if len(index.removed_ids) else ""))
    return 0


def _model_source(spec: str) -> str:
    """The model as recorded in index.json: a local folder made absolute, a hub id or NAME:TAG as given."""
    folder = Path(str(spec).removeprefix("local-dir:"))
    return str(folder.absolute()) if folder.is_dir() else str(spec)


def run(args: argparse.Namespace) -> int:
    from rvl.fileio import OutputBusyError, exclusive_output

    out = Path(args.out if args.index_command == "build" else args.index).absolute()
    try:  # the folder is swapped in whole, so its lock lives beside it: a second writer is refused, not interleaved
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
        if args.index_command != "build":
            return _edit(args)
        model = load_model(args.model, args.device or "cpu")  # Accelerate moves it to this process's device
        if args.on_disk:
            index = build_on_disk_index_from_data(
                model, args.data, args.out, args.kind, args.factory, args.split, args.batch_size, args.chunk,
                args.label_source, args.target_recall, fingerprint=model_fingerprint(args.model),
                extra=_header_extra(args.kind, args.data, args.split, args.label_source, args.model))
            print(f"wrote {args.out}: {args.kind} embeddings, inverted lists on disk\n{describe(index)}")
            return 0
        index = build_index_from_data(model, args.data, args.kind, args.factory, args.split, args.batch_size,
                                      model_dir=args.model, fingerprint=model_fingerprint(args.model, model),
                                      device=args.device, label_source=args.label_source,
                                      target_recall=args.target_recall, max_bytes_per_vector=args.max_bytes_per_vector,
                                      degenerate=args.degenerate,
                                      **({"budget_s": args.build_budget} if args.build_budget is not None else {}))
    except DegenerateImageError as err:
        print(f"rvl index build: error: {err}; pass --degenerate skip to leave such views out, or --degenerate "
              "allow to index them", file=sys.stderr)
        return 2
    except (FileNotFoundError, ManifestError, ValueError) as err:
        print(f"rvl index {args.index_command}: error: {err}", file=sys.stderr)
        return 2
    if index is None:  # non-main accelerate process
        return 0
    out = index.save(args.out)
    print(f"wrote {out}: {args.kind} embeddings\n{describe(index)}")
    return 0
