"""``rvl serve``: the web page and JSON API for a model and its archive index.

    rvl serve --model OUT/model --index idx_studies [--reports-index idx_reports] [--host 127.0.0.1 --port 8000]

Binds the loopback interface by default. Any other ``--host`` needs ``--token`` (or ``RVL_SERVE_TOKEN``); then every
API request must carry ``Authorization: Bearer <token>`` and the page asks for it once.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

TOKEN_ENV = "RVL_SERVE_TOKEN"


def serve_command(model_dir: str | os.PathLike, index_dir: str | os.PathLike | None = None,
                  reports_index_dir: str | os.PathLike | None = None) -> str:
    """The ``rvl serve`` command line that serves a model with its study / report indexes."""
    parts = ["rvl", "serve", "--model", str(model_dir)]
    if index_dir is not None:
        parts += ["--index", str(index_dir)]
    if reports_index_dir is not None:
        parts += ["--reports-index", str(reports_index_dir)]
    return shlex.join(parts)


def demo_serve_command(demo_dir: str | os.PathLike) -> str:
    """The ``rvl serve`` command for an ``rvl demo`` output folder: the model its study index was built with (recorded
    in the index header) and the demo's ``index_study`` / ``index_report`` folders."""
    from rvl.retrieval.store import HEADER_FILE, read_json, resolve_index_dir

    study, report = Path(demo_dir) / "index_study", Path(demo_dir) / "index_report"
    model_dir = read_json(resolve_index_dir(study) / HEADER_FILE).get("extra", {}).get("model_dir")
    return serve_command(model_dir or Path(demo_dir) / "train_multiview" / "model", study, report)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (save_pretrained / rvl pretrain output)")
    parser.add_argument("--index", default=None, help="study index folder (rvl index build --kind study): similar "
                        "studies and text search")
    parser.add_argument("--reports-index", default=None, help="report index folder (rvl index build --kind report): "
                        "kNN zero-shot vote beside the prompt probabilities")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only; "
                        "any other needs --token)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"secret every API request must send "
                        f"(Authorization: Bearer TOKEN); default ${TOKEN_ENV}")
    parser.add_argument("--max-upload-mb", type=float, default=100.0, help="most MiB uploaded per study (default 100)")
    parser.add_argument("--max-images", type=int, default=4, help="most images per uploaded study (default 4)")
    parser.add_argument("--cache-studies", type=int, default=64, help="studies whose embeddings and views stay in "
                        "memory (LRU, default 64; about 2-4 MB each)")
    parser.add_argument("--knn-k", type=int, default=20, help="reports that vote in kNN zero-shot (default 20)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _check_arguments(args: argparse.Namespace) -> str | None:
    if not is_loopback(args.host) and not args.token:
        return (f"--host {args.host} would serve patient data beyond this machine without authentication; "
                f"give --token SECRET (or set {TOKEN_ENV}) or bind 127.0.0.1")
    if not 0 <= args.port <= 65535:
        return f"--port must be 0..65535, got {args.port}"
    if args.max_upload_mb <= 0 or args.max_images < 1 or args.cache_studies < 1 or args.knn_k < 1:
        return "--max-upload-mb, --max-images, --cache-studies and --knn-k must be positive"
    return None


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn.

    Made with ``proto=IPPROTO_TCP``: asyncio switches Nagle's algorithm off only on connections whose socket says so,
    and ``socket.create_server`` leaves ``proto`` 0, which measured 45 ms more per request (delayed ACKs).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def run(args: argparse.Namespace) -> int:
    problem = _check_arguments(args)
    if problem:
        print(f"rvl serve: error: {problem}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from rvl.serve.app import create_app
    except ImportError as err:
        print(f"rvl serve: error: {err.name} is not installed; install the web extra: pip install 'rvl-cxr[serve]'",
              file=sys.stderr)
        return 2
    from rvl.data.io import ImageReadError
    from rvl.serve.service import StudyService

    try:
        service = StudyService.load(args.model, args.index, args.reports_index, args.device,
                                    cache_studies=args.cache_studies, knn_k=args.knn_k, max_images=args.max_images,
                                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    except (FileNotFoundError, ImageReadError, ValueError) as err:
        print(f"rvl serve: error: {err}", file=sys.stderr)
        return 2
    for name, error in service.index_errors.items():
        print(f"rvl serve: warning: --{name.replace('_', '-')} not used: {error}", file=sys.stderr)
    try:  # bind first, so that a busy port is a clear error before anything claims to be serving
        sock = _listen(args.host, args.port)
    except OSError as err:
        print(f"rvl serve: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    indexed = len(service.index) if service.index is not None else "no"
    print(f"rvl serve: {service.model_name} with {indexed} indexed studies on http://{host}:{port}/"
          f"{'  (token required)' if args.token else ''}", flush=True)
    config = uvicorn.Config(create_app(service, args.token), access_log=False, log_config=None,
                            log_level=logging.getLogger().getEffectiveLevel())
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
