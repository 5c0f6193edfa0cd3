"""The ``rvl`` command: one argparse program with a subcommand per job.

Each subcommand lives next to the code it drives and exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules keep their top-level imports light (no torch / open_clip at import time) so that ``rvl --help`` and
``rvl label`` start fast; heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). A command is listed here only once it works.
COMMANDS: dict[str, tuple[str, str]] = {
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


if __name__ == "__main__":
    raise SystemExit(main())
