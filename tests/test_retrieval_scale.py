"""rvl.retrieval at scale: the measured default index, removal on every kind, batch adds, on-disk inverted lists."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

faiss = pytest.importorskip("faiss")

from rvl.retrieval import EmbeddingIndex  # noqa: E402
from rvl.retrieval.archive import build_on_disk_index, iter_embedding_batches, sample_rows  # noqa: E402
from rvl.retrieval.choose import candidate_factories, choose_index, estimate_bytes_per_vector  # noqa: E402
from rvl.retrieval.ops import normalize_rows  # noqa: E402

KINDS = ["Flat", "IVF32,Flat", "HNSW16", "IVF32,SQ8", "IVF32,PQ16x4fs,RFlat"]


def clustered(n: int, dim: int = 32, n_clusters: int = 40, noise: float = 0.7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    return normalize_rows(centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, dim)))


def exact(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(normalize_rows(queries) @ normalize_rows(vectors).T), axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def data():
    vectors = clustered(4000)
    ids = np.random.default_rng(1).choice(10**8, len(vectors), replace=False).astype(np.int64)
    queries = vectors[:200] + 0.05 * np.random.default_rng(3).standard_normal((200, 32)).astype(np.float32)
    return vectors, ids, normalize_rows(queries)


def test_candidates_fit_the_collection_and_memory_budget():
    small = candidate_factories(50_000, 256)
    assert small[-1] == "HNSW32" and all(f.startswith("IVF") for f in small[:-1])
    assert all(50_000 >= 39 * int(f[3:].split(",")[0].split("_")[0]) for f in small[:-1])  # enough training points
    big = candidate_factories(1_000_000, 256)
    assert any("SQ8" in f for f in big) and any("RFlat" in f for f in big) and "IVF16384_HNSW32,Flat" in big
    lean = candidate_factories(1_000_000, 256, max_bytes_per_vector=300)
    assert lean and all(estimate_bytes_per_vector(f, 256) <= 300 for f in lean) and any("SQ8" in f for f in lean)


def test_choice_measures_every_candidate_kind_and_keeps_the_fastest(data):
    vectors, ids, queries = data
    candidates = ["IVF32,Flat", "IVF16_HNSW32,Flat", "HNSW16", "IVF32,SQ8", "IVF32,PQ16x4fs,RFlat"]
    index, factory, params, report = choose_index(vectors, ids, 0.9, candidates=candidates, min_speedup=0.0,
                                                  n_queries=100)
    rows = {r["factory"]: r for r in report["candidates"]}
    assert set(rows) == {"Flat", *candidates} and index.ntotal == len(vectors)  # held-out vectors added back
    measured = [r for r in rows.values() if r["factory"] != "Flat"]
    assert all(r["recall"] is not None and r["qps"] > 0 and r["bytes_per_vector"] > 0 for r in measured)
    reached = [r for r in measured if r["status"] in ("chosen", "reached")]
    assert reached and all(r["recall"] >= 0.9 for r in reached)
    winner = next(r for r in reached if r["status"] == "chosen")
    assert (factory, params) == (winner["factory"], winner["search_params"])
    assert winner["qps"] >= 0.85 * max(r["qps"] for r in reached)  # the fastest, or as fast within timing noise
    assert report["recall"] == pytest.approx(winner["recall"]) and report["speedup"] == pytest.approx(
        winner["speedup"], abs=0.01)
    faiss.ParameterSpace().set_index_parameters(index, params)
    assert recall(index.search(queries, 10)[1], exact(queries, vectors, ids, 10)) >= 0.85


def test_never_slower_than_exact_and_budget_bounds_the_build(data):
    vectors, ids, _ = data
    _, factory, _, report = choose_index(vectors, ids, candidates=["IVF32,Flat", "HNSW16"], min_speedup=1e9)
    assert factory == "Flat" and report["speedup"] == 1.0  # candidates measured, none fast enough: exact kept
    assert all(r["status"] != "chosen" for r in report["candidates"][1:])
    _, factory, _, report = choose_index(vectors, ids, candidates=["IVF32,Flat", "HNSW16"], budget_s=0.0)
    assert factory == "Flat" and all(r["status"].startswith("skipped") for r in report["candidates"][1:])
    _, factory, _, report = choose_index(vectors, ids)  # small collection: exact without measuring
    assert factory == "Flat" and report["method"].startswith("exact")
    _, factory, _, report = choose_index(vectors, ids, 1.01, candidates=["IVF32,Flat"], min_speedup=0.0)
    assert factory == "Flat" and report["candidates"][1]["status"] in ("below target", "slower than exact")


def test_memory_budget_and_the_first_candidate_is_always_measured(data):
    vectors, ids, _ = data
    flat_bytes = estimate_bytes_per_vector("Flat", 32)
    # a tiny time budget still measures the first candidate; a memory budget below Flat rules exact search out
    index, factory, _, report = choose_index(vectors, ids, 0.9, candidates=["IVF32,SQ8", "HNSW16"], budget_s=1e-6,
                                             min_speedup=1e9, max_bytes_per_vector=flat_bytes - 1)
    rows = {r["factory"]: r for r in report["candidates"]}
    assert factory == "IVF32,SQ8" and rows["IVF32,SQ8"]["status"].startswith("chosen")
    assert rows["HNSW16"]["status"].startswith("skipped") and index.ntotal == len(vectors)
    _, factory, _, _ = choose_index(vectors, ids, 0.9, candidates=["IVF32,SQ8"], budget_s=1e-6, min_speedup=1e9)
    assert factory == "Flat"  # the same measurement, but Flat fits: never slower than exact


def test_build_stores_the_choice_and_old_headers_still_load(tmp_path, data):
    vectors, ids, queries = data
    index = EmbeddingIndex.build(vectors, ids, candidates=["IVF32,Flat", "HNSW16"], target_recall=0.9)
    assert index.choice["factory"] == index.factory and index.choice["build_s"] > 0
    out = index.save(tmp_path / "idx")
    header = json.loads((out / "index.json").read_text())
    assert header["choice"]["factory"] == index.factory and len(header["choice"]["candidates"]) == 3
    loaded = EmbeddingIndex.load(out)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])
    for key in ("choice", "removed_count", "on_disk"):  # an index.json written before these fields existed
        header.pop(key)
    (out / "index.json").write_text(json.dumps(header))
    assert EmbeddingIndex.load(out).choice is None and len(EmbeddingIndex.load(out)) == len(vectors)


@pytest.mark.parametrize("factory", KINDS)
def test_removed_ids_are_never_returned(tmp_path, data, factory):
    vectors, ids, _ = data
    meta = pd.DataFrame({"patient_id": [f"p{i % 30}" for i in range(len(ids))]})
    index = EmbeddingIndex.build(vectors, ids, factory=factory, metadata=meta, target_recall=0.9)
    gone = ids[::10]
    assert index.remove_ids(np.r_[gone, [10**9]]) == len(gone) and len(index) == len(ids) - len(gone)
    queries = vectors[::10]  # the removed vectors themselves: each would be its own first hit
    row_of = {int(i): r for r, i in enumerate(ids)}

    def check(idx: EmbeddingIndex) -> None:
        scores, found = idx.search(queries, 20)
        valid = found >= 0
        assert not np.isin(found, gone).any() and valid.mean() > 0.9
        # each returned id carries its own vector's score (ids and vectors still line up after the removal)
        expected = np.einsum("qd,qkd->qk", queries, vectors[[[row_of.get(int(i), 0) for i in r] for r in found]])
        np.testing.assert_allclose(scores[valid], expected[valid], atol=0.06 if "SQ8" in factory else 1e-4)
        found = idx.search(queries, 20, excluded_ids=ids[1:5])[1]
        assert not np.isin(found, np.r_[gone, ids[1:5]]).any()
        assert not np.isin(idx.ids, gone).any() and len(idx.metadata) == len(idx)
    check(index)
    tombstones = factory.startswith("HNSW") or "RFlat" in factory
    assert len(index.removed_ids) == (len(gone) if tombstones else 0)
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    check(loaded)
    assert (tmp_path / "idx" / "removed_ids.npy").exists() == tombstones
    assert loaded.compact() == (len(gone) if tombstones else 0) and len(loaded.removed_ids) == 0
    check(loaded)
    loaded.add(vectors[:1], ids[:1] * 0 + gone[0], metadata=meta[:1])  # a removed id may come back
    assert loaded.search(vectors[:1], 1)[1][0, 0] == gone[0]


def test_add_batches_from_memory_mapped_shards(tmp_path, data):
    vectors, ids, _ = data
    (tmp_path / "emb").mkdir()
    np.save(tmp_path / "emb" / "emb_0.npy", vectors[:1500])
    np.save(tmp_path / "emb" / "emb_1.npy", vectors[1500:])
    np.save(tmp_path / "ids.npy", ids)
    batches = list(iter_embedding_batches(tmp_path / "emb", tmp_path / "ids.npy", batch_size=700))
    assert [len(b[1]) for b in batches] == [700, 700, 100, 700, 700, 700, 400]
    index = EmbeddingIndex.build(vectors[:5], np.arange(5) + 10**9, factory="IVF4,Flat")
    assert index.add_batches(batches[:2]) == 1400 and len(index) == 1405
    bad = [batches[2], (batches[3][0][:100], batches[0][1][:100])]  # the second batch reuses ids: refused
    with pytest.raises(ValueError, match="already in the index"):
        index.add_batches(bad)
    assert len(index) == 1505 and len(index.metadata) == len(index)  # the good batch stayed, with its metadata
    index.add_batches(batches[3:])
    np.testing.assert_array_equal(np.sort(index.ids), np.sort(np.r_[ids, np.arange(5) + 10**9]))
    assert index.search(vectors[3000:3001], 1)[1][0, 0] == ids[3000]
    assert sample_rows(tmp_path / "emb", 50).shape == (50, 32)
    with pytest.raises(ValueError, match="3999 ids for 4000 embedding rows|3999 ids for more"):
        list(iter_embedding_batches(tmp_path / "emb", ids[:-1], batch_size=700))
    with pytest.raises(FileNotFoundError, match="no .npy"):
        list(iter_embedding_batches(tmp_path / "missing"))


def test_on_disk_lists_build_search_remove_and_move(tmp_path, data):
    vectors, ids, queries = data
    np.save(tmp_path / "emb.npy", vectors)
    def batches():
        for start, (v, i) in zip(range(0, len(ids), 1000),
                                 iter_embedding_batches(tmp_path / "emb.npy", ids, batch_size=1000)):
            yield v, i, pd.DataFrame({"n": np.arange(start, start + len(i))})

    index = build_on_disk_index(batches(), tmp_path / "idx", "IVF32,Flat", sample_rows(tmp_path / "emb.npy", 2000),
                                target_recall=0.95)
    assert index.on_disk_lists == tmp_path / "idx" / "index.ivfdata" and len(index) == len(vectors)
    assert index.search_params.startswith("nprobe=") and index.choice["recall"] >= 0.95
    assert recall(index.search(queries, 10)[1], exact(queries, vectors, ids, 10)) >= 0.9
    assert index.metadata.loc[ids[5], "n"] == 5
    with pytest.raises(ValueError, match="on disk"):
        index.add(vectors[:1], [10**9])
    index.remove_ids(ids[:100])
    assert not np.isin(index.search(vectors[:100], 10)[1], ids[:100]).any()
    index.save(tmp_path / "copy")  # the lists go along, so the folder can move
    shutil.move(tmp_path / "copy", tmp_path / "moved")
    moved = EmbeddingIndex.load(tmp_path / "moved")
    assert moved.on_disk_lists == tmp_path / "moved" / "index.ivfdata" and len(moved) == len(vectors) - 100
    np.testing.assert_array_equal(moved.search(queries, 10)[1], index.search(queries, 10)[1])
    assert not np.isin(moved.search(vectors[:100], 10)[1], ids[:100]).any()
    assert moved.compact() == 100 and len(moved.removed_ids) == 0 and moved.faiss_index.ntotal == len(ids) - 100
    index.set_search_params("nprobe=32")  # all lists: both answers exact (tuned nprobe rows can fall back to exact)
    moved.set_search_params("nprobe=32")
    np.testing.assert_array_equal(moved.search(queries, 10)[1], index.search(queries, 10)[1])
    compacted = EmbeddingIndex.load(moved.save(tmp_path / "moved"))  # the compacted lists replace the old ones
    assert compacted.on_disk_lists == tmp_path / "moved" / "index.ivfdata" and len(compacted.removed_ids) == 0
    np.testing.assert_array_equal(compacted.search(queries, 10)[1], index.search(queries, 10)[1])
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == ["index.faiss", "index.ivfdata", "index.json",
                                                                       "metadata.parquet"]
    with pytest.raises(ValueError, match="need an IVF factory"):
        build_on_disk_index(batches(), tmp_path / "hnsw", "HNSW16", vectors[:500])
    assert not (tmp_path / "hnsw").exists() and not list(tmp_path.glob(".hnsw.tmp-*"))  # nothing half-written


def test_index_remove_and_compact_cli(tmp_path, data, capsys):
    from rvl.cli import main
    from rvl.retrieval.cli import describe

    vectors, ids, _ = data
    meta = pd.DataFrame({"study_id": [f"s{i}" for i in range(len(ids))],
                         "patient_id": [f"p{i % 50}" for i in range(len(ids))]})
    index = EmbeddingIndex.build(vectors, ids, metadata=meta, candidates=["HNSW16"], target_recall=0.9)
    text = describe(index)
    assert "chosen by measurement" in text and "bytes/vector" in text and "HNSW16" in text and "built in" in text
    index.save(tmp_path / "idx")
    assert main(["index", "remove", "--index", str(tmp_path / "idx"), "--patient", "p3", "--study-id", "s4"]) == 0
    withdrawn = ids[(meta.patient_id == "p3").to_numpy() | (meta.study_id == "s4").to_numpy()]
    assert f"removed {len(withdrawn)} studies" in capsys.readouterr().out
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    hits = loaded.search(vectors[np.isin(ids, withdrawn)], 10)[1]
    assert len(loaded) == len(ids) - len(withdrawn) and not np.isin(hits, withdrawn).any()
    if loaded.factory.startswith("HNSW"):
        assert len(loaded.removed_ids) == len(withdrawn)
    assert main(["index", "compact", "--index", str(tmp_path / "idx")]) == 0
    compacted = EmbeddingIndex.load(tmp_path / "idx")
    assert len(compacted.removed_ids) == 0 and compacted.faiss_index.ntotal == len(ids) - len(withdrawn)
    assert main(["index", "remove", "--index", str(tmp_path / "idx")]) == 2
    assert "--study-id" in capsys.readouterr().err


def test_index_build_on_disk_cli_streams_chunks(tmp_path, capsys):
    from rvl.cli import main
    from rvl.model import create_model
    from rvl.phantoms import generate_phantoms

    manifest = generate_phantoms(tmp_path / "ph", 24, size=64, seed=3, progress=False)
    model_dir = create_model("rvl-tiny").save_pretrained(tmp_path / "model")
    assert main(["index", "build", "--model", str(model_dir), "--data", str(manifest), "--out", str(tmp_path / "idx"),
                 "--on-disk", "--chunk", "10", "--factory", "IVF4,Flat"]) == 0
    assert "on disk" in capsys.readouterr().out
    index = EmbeddingIndex.load(tmp_path / "idx")
    frame = pd.read_parquet(manifest)
    assert index.on_disk_lists == tmp_path / "idx" / "index.ivfdata" and len(index) == len(frame)
    assert sorted(index.metadata["study_id"]) == sorted(frame["study_id"]) and index.choice["build_s"] > 0
    study = frame["study_id"].iloc[5]
    assert main(["search", "--index", str(tmp_path / "idx"), "--study-id", study, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]  # nothing else on stdout (FAISS's on-disk chatter)
    assert len(hits) == 3 and study not in [h["study_id"] for h in hits]


def test_verify_covers_hidden_removals_of_an_hnsw_index(tmp_path):
    """removed_ids.npy is checksummed with the index: rvl verify passes it, and a flipped byte in it is caught."""
    from rvl.cli import main
    from rvl.retrieval import EmbeddingIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    index = EmbeddingIndex.build(vectors, np.arange(300), factory="HNSW32")
    index.remove_ids(np.arange(10))
    folder = index.save(tmp_path / "idx")
    assert (folder / "removed_ids.npy").is_file()
    assert main(["verify", str(folder)]) == 0
    data = bytearray((folder / "removed_ids.npy").read_bytes())
    data[-1] ^= 0xFF
    (folder / "removed_ids.npy").write_bytes(bytes(data))
    assert main(["verify", str(folder)]) == 1
