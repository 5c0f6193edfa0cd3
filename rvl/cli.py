"""The ``rvl`` command: one argparse program with a subcommand per job.

Each subcommand lives next to the code it drives and exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules keep their top-level imports light (no torch / open_clip at import time) so that ``rvl --help`` and
``rvl label`` start fast; heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

# name -> (module, one-line help). A command is listed here only once it works.
COMMANDS: dict[str, tuple[str, str]] = {
    "label": ("rvl.nlp.cli", "label radiology reports: sections and the 14 CheXpert observations"),
    "phantoms": ("rvl.phantoms.cli", "generate synthetic chest-radiograph studies with reports and ground truth"),
    "prepare": ("rvl.data.cache", "read every image once into a resized on-disk cache of studies"),
    "pretrain": ("rvl.train", "pretrain the multi-view study/report model (Accelerate: 1 CPU/GPU or many)"),
    "index": ("rvl.retrieval.cli", "build a FAISS index of study or report embeddings (rvl index build)"),
    "search": ("rvl.retrieval.search_cli", "find similar studies / reports for images, a study id or a text prompt"),
    "zeroshot": ("rvl.zeroshot", "zero-shot finding probabilities for radiographs from text prompts"),
    "heatmap": ("rvl.heatmap", "grounding heatmap PNG: where on a radiograph a text prompt matches"),
    "evaluate": ("rvl.evaluate", "zero-shot AUC with bootstrap CIs, retrieval R@K and pointing game on a split"),
    "finetune": ("rvl.finetune.cli", "fine-tune an encoder at 1 / 10 / 100 % labels (linear / full, seeds, AUC CIs)"),
    "serve": ("rvl.serve.cli", "web page and JSON API: zero-shot, heatmaps and similar studies for uploaded studies"),
    "demo": ("rvl.demo.cli", "run the whole pipeline on built-in phantoms and write an evaluation report"),
    "verify": ("rvl.verify", "check caches, runs, models, indexes and label outputs against their recorded checksums"),
}


def build_parser() -> argparse.ArgumentParser:
    from rvl.version import __version__

    parser = argparse.ArgumentParser(prog="rvl", description="Report-supervised vision-language pretraining for "
                                     "radiographs: phantoms, prepare, label, pretrain, index, search, zero-shot.")
    parser.add_argument("--version", action="version", version=f"rvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a full disk surfaces from Python, pyarrow, safetensors or torch with its own type
        if not is_disk_full(err):
            raise
        print(f"rvl {args.command}: error: out of disk space while writing ({err}); the previous version of the "
              "output is untouched: free space and run the command again", file=sys.stderr)
        return 2


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "errno 28", "file too large", "errno 27", "os error 27",
                   "disk quota exceeded")


def is_disk_full(err: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is a failed write for lack of space."""
    seen = 0
    while err is not None and seen < 8:
        if getattr(err, "errno", None) in _DISK_FULL_ERRNOS or any(t in str(err).lower() for t in _DISK_FULL_TEXT):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


if __name__ == "__main__":
    raise SystemExit(main())
