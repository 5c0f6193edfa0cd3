"""rvl serve: requests/s and p50/p95 latency of /api/zeroshot and /api/similar against the same calls in-process.

    .venv/bin/python bench/bench_serve.py                      # rvl-tiny, 200 phantom studies, 60 requests per case
    .venv/bin/python bench/bench_serve.py --model rvl-small --studies 200 --requests 40

Builds a small phantom archive (2-view DICOM studies), an untrained model and its study + report indexes, starts
``rvl serve`` on a loopback port in a subprocess and sends sequential requests over HTTP (httpx, keep-alive). The
baseline, measured in the same run, is a :class:`rvl.serve.service.StudyService` in this process answering the same
calls (the same method, plus ``json.dumps`` of its answer): the ratio is the API's overhead (multipart upload and
parsing, routing, validation, JSON over a socket). The baseline calls run in one worker thread, as the server runs its
handlers: from the main thread, where torch's OpenMP team lives, single-query FAISS searches measured 3-8x slower on a
loaded 2-core machine, which would flatter the API. Cases:

- ``zeroshot new``: every request uploads a study not seen before (decode DICOM, embed 2 views, 14 labels, kNN vote);
- ``zeroshot cached``: the same study again (found in the LRU cache by content; the upload is still sent and hashed);
- ``similar``: the k=8 most similar studies of a cached upload (by ``upload_id``);
- ``similar -patient``: the same, leaving the query's patient out (FAISS ID selector).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_archive(root: Path, model_name: str, studies: int):
    from rvl.data import read_manifest
    from rvl.model import create_model
    from rvl.phantoms import generate_phantoms
    from rvl.retrieval.cli import build_index_from_data
    from rvl.retrieval.embed import load_model, model_fingerprint

    manifest = generate_phantoms(root / "ph", studies, size=256, seed=0, fmt="both", progress=False)
    model_dir = create_model(model_name).save_pretrained(root / "model")
    model = load_model(model_dir, "cpu")
    for kind in ("study", "report"):
        build_index_from_data(model, str(manifest), kind, model_dir=str(model_dir), device="cpu",
                              fingerprint=model_fingerprint(model_dir)).save(root / kind)
    return model_dir, read_manifest(manifest)


def timed(fn: Callable[[int], object], n: int, warmup: int = 3) -> np.ndarray:
    for i in range(warmup):
        fn(-1 - i)
    seconds = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="rvl-tiny", help="packaged model config (untrained; default rvl-tiny)")
    parser.add_argument("--studies", type=int, default=200, help="phantom studies in the index (default 200)")
    parser.add_argument("--requests", type=int, default=60, help="timed requests per case (default 60)")
    args = parser.parse_args()

    import httpx

    from rvl.serve.service import StudyService

    with tempfile.TemporaryDirectory(prefix="rvl-bench-serve-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model_dir, frame = build_archive(root, args.model, args.studies)
        print(f"archive: {len(frame)} studies, {args.model}, built in {time.perf_counter() - t0:.0f} s", flush=True)
        uploads = [[("files", (Path(p).name, Path(p).read_bytes())) for p in paths] for paths in frame["dicom_paths"]]
        # each side gets studies it has never seen (3 warm-up + n timed each), after the first 4 and before the last
        n_new = min(args.requests, (len(uploads) - 5) // 2 - 3)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "rvl", "serve", "--model", str(model_dir), "--index",
                                   str(root / "study"), "--reports-index", str(root / "report"), "--port", str(port),
                                   "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        local = StudyService.load(model_dir, root / "study", root / "report", "cpu")
        try:
            url = f"http://127.0.0.1:{port}"
            client = httpx.Client(base_url=url, timeout=60)
            deadline = time.time() + 120
            while True:
                try:
                    if client.get("/api/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    if server.poll() is not None or time.time() > deadline:
                        raise SystemExit("rvl serve did not start") from None
                    time.sleep(0.3)

            def as_bytes(files):
                return [(name, data) for _, (name, data) in files]

            def post(path: str, **kwargs) -> None:
                response = client.post(path, **kwargs)
                response.raise_for_status()
                response.json()

            cached = uploads[-1]
            upload_id = client.post("/api/zeroshot", files=cached).json()["study"]["upload_id"]
            with ThreadPoolExecutor(1) as worker:
                entry = worker.submit(local.upload_study, as_bytes(cached)).result()
            patient = frame["patient_id"].iloc[-1]
            api_new = lambda i: post("/api/zeroshot", files=uploads[7 + i])  # noqa: E731
            local_new = lambda i: json.dumps(local.zeroshot(local.upload_study(  # noqa: E731
                as_bytes(uploads[n_new + 10 + i]))))
            cases = {
                "zeroshot new": (api_new, local_new, n_new),
                "zeroshot cached": (lambda i: post("/api/zeroshot", files=cached),
                                    lambda i: json.dumps(local.zeroshot(local.upload_study(as_bytes(cached)))),
                                    args.requests),
                "similar": (lambda i: post("/api/similar", data={"upload_id": upload_id, "k": 8}),
                            lambda i: json.dumps(local.similar(entry, 8)), args.requests),
                "similar -patient": (lambda i: post("/api/similar", data={"upload_id": upload_id, "k": 8,
                                                                           "patient_id": patient,
                                                                           "exclude_patient": "true"}),
                                     lambda i: json.dumps(local.similar(local.cached_upload(entry.key.split(":")[1],
                                                                                           patient), 8,
                                                                        exclude_patient=True)), args.requests),
            }
            rows = []
            with ThreadPoolExecutor(1) as worker:
                for name, (api_call, local_call, n) in cases.items():
                    api_s = timed(api_call, n)
                    local_s = timed(lambda i: worker.submit(local_call, i).result(), n)
                    rows.append((name, n, api_s, local_s))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"\nrvl serve vs in-process, {args.model}, {len(frame)}-study Flat index, sequential requests, "
          f"{os.environ['OMP_NUM_THREADS']} torch threads (ratio = API / in-process)")
    header = (f"{'case':<17} {'n':>4} | {'API req/s':>9} {'p50 ms':>7} {'p95 ms':>7} | {'local req/s':>11} "
              f"{'p50 ms':>7} {'p95 ms':>7} | {'p50 ratio':>9} {'+ms p50':>8}")
    print(header)
    print("-" * len(header))
    for name, n, api_s, local_s in rows:
        a50, a95, l50, l95 = (1000 * float(np.percentile(s, q)) for s in (api_s, local_s) for q in (50, 95))
        print(f"{name:<17} {n:>4} | {n / api_s.sum():>9.1f} {a50:>7.1f} {a95:>7.1f} | {n / local_s.sum():>11.1f} "
              f"{l50:>7.1f} {l95:>7.1f} | {a50 / l50:>8.2f}x {a50 - l50:>8.1f}")


if __name__ == "__main__":
    main()
