"""ANN vs exact search on clustered synthetic embeddings (or saved real ones): recall@10 and QPS as a ratio to Flat.

    .venv/bin/python bench/bench_retrieval.py            # 200,000 x 256, 1,000 queries
    .venv/bin/python bench/bench_retrieval.py --quick    # 30,000 x 256
    .venv/bin/python bench/bench_retrieval.py --vectors emb.npy   # real embeddings (n, d) float32

Target (issue 5): recall@10 >= 0.95 at >= 20x the exact Flat QPS on CPU. Every index is an rvl EmbeddingIndex
(IDMap2 + inner product on normalised vectors) with its nprobe / efSearch auto-tuned at build time to recall 0.95 on
a sample of the data; the Flat baseline is measured in the same run on the same queries.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from rvl.retrieval import EmbeddingIndex, default_factory
from rvl.retrieval.index import FLAT_MAX_VECTORS


def clustered_vectors(n: int, dim: int, n_clusters: int, seed: int, separation: float = 0.5) -> np.ndarray:
    """Gaussian mixture with unequal cluster sizes and spreads, like study embeddings.

    ``separation`` scales the cluster centres relative to the within-cluster noise: at 1.0 clusters barely overlap
    and one IVF probe finds everything; at 0.5 neighbours straddle clusters and ANN has to work.
    """
    rng = np.random.default_rng(seed)
    centers = separation * rng.standard_normal((n_clusters, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    labels = rng.choice(n_clusters, n, p=weights)
    spread = rng.uniform(0.6, 1.2, n_clusters).astype(np.float32)
    return centers[labels] + spread[labels, None] * rng.standard_normal((n, dim)).astype(np.float32)


def timed_search(index: EmbeddingIndex, queries: np.ndarray, k: int, repeats: int = 5) -> tuple[np.ndarray, float]:
    best, found = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        found = index.search(queries, k)[1]
        best = min(best, time.perf_counter() - start)
    return found, len(queries) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30k vectors instead of 200k")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--vectors", default=None, help=".npy of real embeddings; queries are held-out rows")
    parser.add_argument("--factories", nargs="+", default=None, help="default: the auto choice, HNSW32, IVF-PQ")
    parser.add_argument("--separation", type=float, default=0.75, help="cluster centre scale vs noise (synthetic)")
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    k = 10
    if args.vectors:
        data = np.load(args.vectors).astype(np.float32)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(data))
        queries, vectors = data[order[:args.queries]], data[order[args.queries:]]
        source = f"{args.vectors}"
    else:
        n = args.n or (30_000 if args.quick else 200_000)
        data = clustered_vectors(n + args.queries, args.dim, n_clusters=max(64, n // 200), seed=0,
                                 separation=args.separation)
        queries, vectors = data[:args.queries], data[args.queries:]
        source = f"synthetic clustered ({max(64, n // 200)} clusters, separation {args.separation})"
    ids = np.arange(len(vectors), dtype=np.int64)
    n, dim = vectors.shape
    auto = default_factory(n, dim)
    ivf = default_factory(max(n, FLAT_MAX_VECTORS + 1), dim).split(",")[0]  # IVF list count for this size
    factories = args.factories or [f for f in dict.fromkeys([auto, f"{ivf},Flat", "HNSW32", f"{ivf},SQ8"])
                                   if f != "Flat"]
    print(f"# {source}: {n} x {dim} database, {len(queries)} queries, k={k}, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads, default factory for this size: {auto}")

    flat = EmbeddingIndex.build(vectors, ids, factory="Flat")
    truth, flat_qps = timed_search(flat, queries, k)
    results = []
    for factory in factories:
        start = time.perf_counter()
        index = EmbeddingIndex.build(vectors, ids, factory=factory, target_recall=0.95)
        build_s = time.perf_counter() - start
        found, qps = timed_search(index, queries, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
        results.append((factory, index.search_params, build_s, recall, qps, index.bytes_per_vector()))
        del index
        # the machine is shared: re-time Flat after each index and keep its best, so ratios are conservative
        flat_qps = max(flat_qps, timed_search(flat, queries, k)[1])
    rows = [("Flat (exact)", "-", 0.0, 1.0, flat_qps, 1.0, flat.bytes_per_vector())]
    rows += [(f, p, b, r, q, q / flat_qps, bpv) for f, p, b, r, q, bpv in results]
    print(f"| {'index':<34} | {'params':<12} | build s | recall@10 | QPS      | x Flat QPS | bytes/vec |")
    print(f"|{'-' * 36}|{'-' * 14}|---------|-----------|----------|------------|-----------|")
    for name, params, build_s, recall, qps, ratio, bpv in rows:
        flag = "  <- meets target" if recall >= 0.95 and ratio >= 20 else ""
        print(f"| {name:<34} | {params:<12} | {build_s:7.1f} | {recall:9.3f} | {qps:8.0f} | {ratio:10.1f} | "
              f"{bpv:9.0f} |{flag}")


if __name__ == "__main__":
    main()
