"""The default index, chosen by measured speed at the target recall (``EmbeddingIndex.build`` without a factory).

Which FAISS index is fastest at a given recall depends on the data, not on the collection size alone: on 200k
normalised 256-d vectors ``IVF1024,Flat`` can need ``nprobe=512`` (slower than exact search) where ``IVF2048`` needs
``nprobe=2``. So :func:`choose_index` measures:

1. A slice of the vectors is held out as queries the database has not seen (as at search time; database vectors
   would find themselves and overstate recall). Exact ``Flat`` search of the rest gives their true top-k and the
   baseline speed.
2. Each candidate that fits the collection (:func:`candidate_factories`: IVF at 2·√n to 16·√n lists, the larger
   ones with an HNSW coarse quantiser; HNSW32; for large collections IVF with 8-bit codes and IVF-PQ with exact
   re-ranking) is trained (spherical k-means on
   ``min(n, 64·nlist)`` points) and filled with the rest, then its nprobe / efSearch is raised step by step until
   recall@k on the held-out queries reaches the target, and it is timed on the same queries. A sweep stops as soon as
   the candidate is no faster than exact search.
3. The fastest candidate that reaches the target (of those within 15 % of the fastest, timing noise on a shared
   machine, the most accurate) wins if it is at least ``min_speedup`` times faster than exact search, otherwise
   exact ``Flat`` is kept: the default is never slower than no index. (With a memory budget that float32 ``Flat``
   exceeds, exact search is only the speed baseline and the most accurate candidate within the
   budget is kept when none reaches the target.)

Build time is bounded: a candidate is started only while the time spent so far plus an estimate of its build time
fits in ``budget_s``. Estimates come from the measured speed of exact search on this machine, corrected by the
candidates already built; the first (cheapest) candidate is always built unless the budget is 0, to calibrate them.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import faiss
import numpy as np

logger = logging.getLogger(__name__)

MEASURE_MIN_VECTORS = 20_000  # below this exact search takes well under a millisecond per query: keep Flat
DEFAULT_BUDGET_S = 300.0
TRAIN_POINTS_PER_LIST = 64  # k-means points per inverted list (faiss warns below 39)
KMEANS_ITERATIONS = 10
LARGE_COLLECTION = 500_000  # from here compressed candidates (SQ8, PQ with exact re-ranking) are tried too
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
REFINE_FACTOR = 4  # PQ candidates re-rank k·4 codes exactly
SAME_SPEED = 0.85  # candidates within 15 % of the fastest count as equally fast (timing noise): the most accurate wins


@dataclass
class CandidateResult:
    """One measured candidate (``status``: chosen, reached, below-target, slower-than-exact, skipped: ...)."""

    factory: str
    search_params: str = ""
    recall: float = float("nan")
    qps: float = float("nan")
    speedup: float = float("nan")
    build_s: float = 0.0
    bytes_per_vector: float = float("nan")
    status: str = ""


def _pow2(value: float) -> int:
    return 2 ** int(round(math.log2(max(1.0, value))))


def ivf_factory(n_lists: int, codes: str = "Flat") -> str:
    """IVF factory string; from 4096 lists on the coarse quantiser is an HNSW graph (a flat one would cost more per
    query than the lists it selects)."""
    return f"IVF{n_lists}{'_HNSW32' if n_lists >= 4096 else ''},{codes}"


def estimate_bytes_per_vector(factory: str, dim: int) -> float:
    """Serialised bytes per vector of an ``IDMap2,<factory>`` index (8 B id map + codes + list ids / graph links)."""
    size = 8.0
    parts = factory.split(",")
    if parts[0].startswith("HNSW"):
        size += 4 * dim + 2 * 4 * int(re.sub(r"\D.*", "", parts[0][4:]) or 32) * 1.05  # level-0 links dominate
        return size
    if parts[0].startswith("IVF"):
        size += 8
        parts = parts[1:]
    for part in parts:
        if part == "Flat" or part == "RFlat":
            size += 4 * dim
        elif part.startswith("SQ"):
            size += dim * (1 if part == "SQ8" else 2 if part == "SQfp16" else 0.5)
        elif match := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs)?r?", part):
            size += int(match.group(1)) * int(match.group(2) or 8) / 8
    return size


def candidate_factories(n_vectors: int, dim: int, max_bytes_per_vector: float | None = None) -> list[str]:
    """Factories worth measuring for a collection, cheapest to build first.

    IVF at ≈2·√n, 4·√n, 8·√n and 16·√n lists (powers of two, >= 39 training points per list), HNSW32,
    and for large collections (or a memory budget below float32) IVF with 8-bit scalar codes and IVF-PQ (4-bit
    fast-scan) with exact re-ranking of ``k·4`` candidates. Candidates over ``max_bytes_per_vector`` are left out.
    """
    root = math.sqrt(n_vectors)
    lists = sorted({_pow2(m * root) for m in (2, 4, 8, 16)})
    out = [ivf_factory(n) for n in lists if n >= 16 and n_vectors >= 39 * n]
    out.append("HNSW32")
    flat_bytes = estimate_bytes_per_vector("IVF1,Flat", dim)
    if n_vectors >= LARGE_COLLECTION or (max_bytes_per_vector is not None and max_bytes_per_vector < flat_bytes):
        trainable = [n for n in lists if n_vectors >= 39 * n] or [16]
        out += [ivf_factory(n, "SQ8") for n in trainable[:-1] or trainable]
        if dim % 2 == 0:
            out += [ivf_factory(trainable[-1], f"PQ{dim // 2}x4fs,RFlat")]
    if max_bytes_per_vector is not None:
        out = [f for f in out if estimate_bytes_per_vector(f, dim) <= max_bytes_per_vector]
    return out


def trained_empty_index(factory: str, train_vectors: np.ndarray, seed: int = 0) -> faiss.IndexIDMap2:
    """An empty inner-product ``IDMap2,<factory>`` index, trained on (a sample of) ``train_vectors`` if it needs it.

    IVF coarse quantisers use spherical k-means on ``min(n, 64·nlist)`` points: on normalised vectors, inner-product
    assignment to unnormalised centroids favours large-norm centroids and stalls recall (0.87 at nprobe=32 on the
    hard benchmark data).

    Raises:
        ValueError: ``factory`` is not a valid factory string, or has more lists than training vectors.
    """
    dim = train_vectors.shape[1]
    try:
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {str(err).splitlines()[0]}") from err
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            if len(train_vectors) < ivf.nlist:
                raise ValueError(f"factory {factory!r} has {ivf.nlist} inverted lists but only {len(train_vectors)} "
                                 "vectors to train them; use fewer lists or 'Flat'")
            ivf.cp.spherical = True
            ivf.cp.niter = KMEANS_ITERATIONS
        n_train = min(len(train_vectors), TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else 100_000)
        if "PQ" in factory:
            n_train = min(len(train_vectors), max(n_train, 65_536))  # PQ codebooks want 256 points per centroid
        logger.info("training %s on %d of %d vectors", factory, n_train, len(train_vectors))
        index.train(train_vectors[np.sort(rng.choice(len(train_vectors), n_train, replace=False))])
    return index


def make_index(factory: str, vectors: np.ndarray, ids: np.ndarray, seed: int = 0) -> faiss.IndexIDMap2:
    """:func:`trained_empty_index` filled with ``vectors`` under ``ids``."""
    index = trained_empty_index(factory, vectors, seed)
    index.add_with_ids(vectors, ids)
    return index


def search_param_grid(index: faiss.Index) -> list[str]:
    """ParameterSpace strings to sweep for an ``IDMap2`` index, cheapest (fastest) first; ``[""]`` for exact."""
    inner = faiss.downcast_index(index.index)
    refine = ""
    if isinstance(inner, faiss.IndexRefine):
        refine, inner = f",k_factor_rf={REFINE_FACTOR}", faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexHNSW):
        return [f"efSearch={ef}{refine}" for ef in EF_SEARCHES]
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is None:
        return [""]
    graph = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
    return [f"nprobe={p}" + (f",quantizer_efSearch={max(32, 2 * p)}" if graph else "") + refine
            for p in NPROBES if p <= ivf.nlist]


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, min_seconds: float = 0.2,
                 max_repeats: int = 20) -> tuple[np.ndarray, float]:
    """Top-k ids and queries/s (the best of repeated runs: the machine may be shared)."""
    best, spent, found = float("inf"), 0.0, None
    for _ in range(max_repeats):
        start = time.perf_counter()
        found = index.search(queries, k)[1]
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent >= min_seconds and _ >= 1:
            break
    return found, len(queries) / max(best, 1e-9)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` found in the same row of ``found``."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def sweep_search_params(index: faiss.Index, grid: Sequence[str], recall_of: Callable[[np.ndarray], float],
                        queries: np.ndarray, k: int, target_recall: float, min_qps: float = 0.0
                        ) -> tuple[str, float, float, bool]:
    """Apply ``grid`` settings in order until ``recall_of(found ids)`` reaches the target.

    Returns ``(params, recall, qps, reached)``; stops early (not reached) once a setting answers fewer than
    ``min_qps`` queries/s, as every later setting is slower still.
    """
    space = faiss.ParameterSpace()
    params, got, qps = grid[-1], 0.0, 0.0
    for params in grid:
        if params:
            space.set_index_parameters(index, params)
        found, qps = timed_search(index, queries, k, min_seconds=0.05, max_repeats=3)
        got = recall_of(found)
        if got >= target_recall:
            return params, got, qps, True
        if qps < min_qps:
            break
    return params, got, qps, False


class _BuildClock:
    """Predicts build seconds from the speed of exact search measured on this machine (one unit = one query-vector
    inner product of the exact scan; factors calibrated on 200k x 256, 2 cores), corrected by the ratio of measured
    to predicted time of the candidates built so far (exact search suffers more from a busy machine than k-means)."""

    HNSW_UNITS_PER_VECTOR = 20_000  # HNSW32 insertion, efConstruction 40
    GRAPH_QUANTIZER_UNITS = 4_500  # an HNSW coarse-quantiser lookup, per vector and k-means iteration

    def __init__(self, flat_seconds: float, n_queries: int, n_vectors: int) -> None:
        self.unit_s = flat_seconds / max(1, n_queries * n_vectors)
        self.correction = 1.0

    def observe(self, factory: str, n_vectors: int, seconds: float) -> None:
        raw = self._raw_estimate(factory, n_vectors)
        if raw > 0:
            self.correction = seconds / raw

    def estimate(self, factory: str, n_vectors: int) -> float:
        return self.correction * self._raw_estimate(factory, n_vectors)

    def _raw_estimate(self, factory: str, n_vectors: int) -> float:
        if factory.startswith("HNSW"):
            return self.unit_s * self.HNSW_UNITS_PER_VECTOR * n_vectors
        match = re.match(r"IVF(\d+)(_HNSW)?", factory)
        if not match:
            return 0.0
        n_lists = int(match.group(1))
        per_lookup = self.GRAPH_QUANTIZER_UNITS if match.group(2) else n_lists
        n_train = min(n_vectors, TRAIN_POINTS_PER_LIST * n_lists)
        codes = 4 * n_vectors * 256 if "PQ" in factory else 0  # PQ codebook training and encoding
        return self.unit_s * (per_lookup * (KMEANS_ITERATIONS * n_train + n_vectors) + codes)


def choose_index(vectors: np.ndarray, ids: np.ndarray, target_recall: float = 0.95, k: int = 10, *,
                 budget_s: float = DEFAULT_BUDGET_S, min_speedup: float = 1.5, n_queries: int = 256,
                 max_bytes_per_vector: float | None = None, candidates: Sequence[str] | None = None,
                 min_vectors: int = MEASURE_MIN_VECTORS, seed: int = 0
                 ) -> tuple[faiss.IndexIDMap2, str, str, dict[str, Any]]:
    """Build the fastest index reaching ``target_recall`` on held-out queries (see the module docstring).

    Args:
        vectors: ``(n, d)`` normalised float32 vectors.
        ids: ``(n,)`` unique int64 ids.
        target_recall: Recall@k against exact search on the held-out queries.
        k: Neighbours per query.
        budget_s: Build-time budget of the measurement.
        min_speedup: An approximate index is kept only when at least this many times faster than exact search.
        n_queries: Held-out queries (at most a tenth of the collection).
        max_bytes_per_vector: Leave out candidates whose codes + ids + links need more.
        candidates: Factories to measure (default :func:`candidate_factories`).
        min_vectors: Below this many vectors exact ``Flat`` is kept without measuring.
        seed: Seed of the held-out split and the training samples.

    Returns:
        ``(IDMap2 index holding all vectors, factory, search params, report)``; the report (stored in ``index.json``
        as ``choice``) has the winner's recall, speed-up over exact search and every candidate's measurement.
    """
    started = time.perf_counter()
    n = len(vectors)
    report: dict[str, Any] = {"method": "measured", "target_recall": target_recall, "k": k, "budget_s": budget_s,
                              "min_speedup": min_speedup, "recall": 1.0, "speedup": 1.0, "candidates": []}
    if n < max(min_vectors, 20 * k) and candidates is None:
        report.update(method="exact below measuring size", min_vectors=min_vectors)
        return make_index("Flat", vectors, ids), "Flat", "", report
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_q = max(k, min(n_queries, n // 10))
    held, rest = np.sort(order[:n_q]), np.sort(order[n_q:])
    queries, base, base_ids = vectors[held], vectors[rest], ids[rest]

    flat = make_index("Flat", base, base_ids)
    truth, flat_qps = timed_search(flat, queries, k, min_seconds=0.3)
    clock = _BuildClock(n_q / flat_qps, n_q, len(base))
    results = [CandidateResult("Flat", "", 1.0, flat_qps, 1.0, 0.0, estimate_bytes_per_vector("Flat", base.shape[1]),
                               "exact baseline")]
    best: tuple[faiss.IndexIDMap2, CandidateResult] | None = None
    todo = list(candidates) if candidates is not None else candidate_factories(n, vectors.shape[1],
                                                                               max_bytes_per_vector)
    # exact search over float32 may not fit the memory budget: then it only serves as the speed baseline
    flat_fits = max_bytes_per_vector is None or results[0].bytes_per_vector <= max_bytes_per_vector
    built, fastest_qps = 0, 0.0
    for factory in todo:
        if factory == "Flat":
            continue
        spent = time.perf_counter() - started
        expected = clock.estimate(factory, len(base))
        # the first candidate is always built (unless the budget is 0): its time calibrates the later estimates
        if spent + expected > budget_s and (built or budget_s <= 0):
            results.append(CandidateResult(factory, status=f"skipped: build budget ({spent:.0f} s spent + "
                                                           f"~{expected:.0f} s > {budget_s:.0f} s)"))
            continue
        result, index = _measure(factory, base, base_ids, queries, truth, k, target_recall, min_speedup * flat_qps,
                                 seed)
        # the machine may be shared: re-time exact search (once) after each candidate and keep its best (conservative)
        flat_qps = max(flat_qps, timed_search(flat, queries, k, max_repeats=1)[1])
        results.append(result)
        if result.build_s > 0:
            built += 1
            clock.observe(factory, len(base), result.build_s)
        if result.status == "reached":
            fastest_qps = max(fastest_qps, result.qps)
        if result.status == "reached" and (best is None or _better(result, best[1], fastest_qps)):
            best = (index, result)
        elif not flat_fits and index is not None and (best is None or (best[1].status != "reached"
                                                                        and result.recall > best[1].recall)):
            best = (index, result)  # nothing else fits the memory budget: keep the most accurate so far
        del index
    results[0].qps = flat_qps
    for result in results:
        result.speedup = result.qps / flat_qps if result.qps == result.qps else float("nan")
    if best is not None and (best[1].qps >= min_speedup * flat_qps or not flat_fits):
        index, winner = best
    else:
        index, winner = flat, results[0]
    for result in results:
        if result.status == "reached" and result.qps < min_speedup * flat_qps:
            result.status = "reached, but not faster than exact"
    if winner.status != "reached" and winner is not results[0]:
        logger.warning("no candidate within %s bytes/vector reached recall@%d %.2f; keeping the most accurate, %s "
                       "(%.3f)", max_bytes_per_vector, k, target_recall, winner.factory, winner.recall)
    winner.status = "chosen" if winner.status in ("reached", "exact baseline") else f"chosen ({winner.status})"
    index.add_with_ids(queries, ids[held])  # the held-out vectors belong to the collection too
    report.update(factory=winner.factory, search_params=winner.search_params, recall=round(winner.recall, 4),
                  qps=round(winner.qps, 1), exact_qps=round(flat_qps, 1), speedup=round(winner.qps / flat_qps, 2),
                  held_out_queries=n_q,
                  build_s=round(time.perf_counter() - started, 2), candidates=[_rounded(r) for r in results])
    logger.info("index choice: %s (%s) recall@%d %.3f at %.1fx exact search", winner.factory, winner.search_params,
                k, winner.recall, report["speedup"])
    return index, winner.factory, winner.search_params, report


def _better(new: CandidateResult, old: CandidateResult, fastest_qps: float) -> bool:
    """Whether ``new`` (reached the target) replaces ``old``: the winner stays within :data:`SAME_SPEED` of the fastest
    candidate so far (``fastest_qps``, ``new`` included), and among such, the more accurate one wins."""
    if old.status != "reached" or old.qps < SAME_SPEED * fastest_qps:
        return True
    return new.qps >= SAME_SPEED * fastest_qps and new.recall > old.recall


def _measure(factory: str, base: np.ndarray, base_ids: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int,
             target_recall: float, min_qps: float, seed: int) -> tuple[CandidateResult, faiss.Index | None]:
    start = time.perf_counter()
    try:
        index = make_index(factory, base, base_ids, seed=seed)
    except (ValueError, RuntimeError) as err:
        return CandidateResult(factory, status=f"failed: {str(err).splitlines()[0]}"), None
    build_s = time.perf_counter() - start
    params, recall, qps, reached = sweep_search_params(index, search_param_grid(index),
                                                       lambda found: recall_at_k(found, truth), queries, k,
                                                       target_recall, min_qps)
    if reached:
        qps = max(qps, timed_search(index, queries, k, min_seconds=0.2)[1])
    status = "reached" if reached else ("slower than exact" if qps < min_qps else "below target")
    bpv = len(faiss.serialize_index(index)) / max(1, index.ntotal)
    logger.info("candidate %s: %s recall %.3f, %.0f q/s, built in %.1f s (%s)", factory, params, recall, qps,
                build_s, status)
    return CandidateResult(factory, params, recall, qps, float("nan"), build_s, bpv, status), index


def _rounded(result: CandidateResult) -> dict[str, Any]:
    out = asdict(result)
    for key, digits in (("recall", 4), ("qps", 1), ("speedup", 2), ("build_s", 2), ("bytes_per_vector", 1)):
        value = out[key]
        out[key] = None if value != value else round(float(value), digits)  # NaN is not JSON
    return out
