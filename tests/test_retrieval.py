"""rvl.retrieval: build / search / add / remove / save / load, crash-safe saves, mismatch refusal, patient filters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

faiss = pytest.importorskip("faiss")

from rvl.retrieval import EmbeddingIndex, IndexMismatchError, default_factory, filter_ids, search_filtered  # noqa
from rvl.retrieval import store  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_force(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    sims = unit(queries) @ unit(vectors).T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 32)).astype(np.float32) * rng.uniform(0.5, 3, (600, 1)).astype(np.float32)
    ids = rng.choice(10**9, 600, replace=False).astype(np.int64)
    meta = pd.DataFrame({"study_id": [f"s{i}" for i in range(600)], "patient_id": [f"p{i % 50}" for i in range(600)],
                         "study_date": [f"20{10 + i % 12:02d}-0{1 + i % 9}-15" for i in range(600)],
                         "image_paths": [[f"img{i}_a.png", f"img{i}_b.png"] for i in range(600)]})
    return vectors, ids, meta


def test_flat_search_matches_brute_force_cosine(data):
    vectors, ids, meta = data
    index = EmbeddingIndex.build(vectors, ids, metadata=meta)
    assert index.factory == "Flat" and len(index) == 600 and index.dim == 32
    queries = np.random.default_rng(1).standard_normal((37, 32)).astype(np.float32)
    scores, found = index.search(queries, k=7, batch_size=10)  # several batches
    np.testing.assert_array_equal(found, brute_force(queries, vectors, ids, 7))
    expected = (unit(queries) @ unit(vectors).T).max(axis=1)
    np.testing.assert_allclose(scores[:, 0], expected, rtol=1e-5)  # cosine, not raw inner product
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_fewer_than_k_pads_with_minus_one():
    index = EmbeddingIndex.build(np.eye(3, 8, dtype=np.float32), np.array([5, 6, 7]))
    scores, found = index.search(np.eye(1, 8, dtype=np.float32), k=5)
    assert found[0, :3].tolist()[0] == 5 and sorted(found[0, :3].tolist()) == [5, 6, 7]
    assert found[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()


def test_add_remove_and_bad_input(data):
    vectors, ids, meta = data
    index = EmbeddingIndex.build(vectors[:500], ids[:500], metadata=meta[:500])
    with pytest.raises(ValueError, match="metadata"):
        index.add(vectors[500:], ids[500:])  # the index carries metadata columns
    index.add(vectors[500:], ids[500:], metadata=meta[500:])
    assert len(index) == 600 and index.metadata.loc[ids[550], "study_id"] == "s550"
    with pytest.raises(ValueError, match="already in the index"):
        index.add(vectors[:1], ids[:1], metadata=meta[:1])
    with pytest.raises(ValueError, match="dim"):
        index.search(np.ones((1, 31), np.float32), 3)
    assert index.remove_ids(np.r_[ids[:10], [123]]) == 10
    assert len(index) == 590 and ids[0] not in index.metadata.index
    found = index.search(vectors[:10], k=1)[1][:, 0]
    assert not np.isin(found, ids[:10]).any()
    with pytest.raises(ValueError, match="unique"):
        EmbeddingIndex.build(vectors[:2], np.array([1, 1]))
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        EmbeddingIndex.build(vectors[:20], ids[:20], factory="Bogus")
    with pytest.raises(ValueError, match="64 inverted lists but only 20 vectors"):
        EmbeddingIndex.build(vectors[:20], ids[:20], factory="IVF64,Flat")


@pytest.mark.parametrize("factory", ["HNSW16", "IVF16,Flat"])
def test_approximate_indexes_tune_and_stay_accurate(factory):
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((20, 24))
    vectors = (centers[rng.integers(0, 20, 3000)] + 0.6 * rng.standard_normal((3000, 24))).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64) * 3
    index = EmbeddingIndex.build(vectors, ids, factory=factory, target_recall=0.9)
    assert index.is_approximate and index.search_params  # nprobe / efSearch chosen by tune()
    queries = vectors[:100] + 0.05 * rng.standard_normal((100, 24)).astype(np.float32)
    found = index.search(queries, 10)[1]
    truth = brute_force(queries, vectors, ids, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.85
    removed = index.remove_ids(ids[:5])  # HNSW: rebuilt; IVF: in place
    assert removed == 5 and len(index) == 2995 and not np.isin(index.search(vectors[:5], 3)[1], ids[:5]).any()


def test_default_factory_by_size():
    assert default_factory(1000, 512) == "Flat"
    assert default_factory(200_000, 256).startswith("IVF")
    assert default_factory(10_000_000, 256).endswith("SQ8")


def test_save_load_roundtrip_and_consistency_checks(tmp_path, data):
    vectors, ids, meta = data
    index = EmbeddingIndex.build(vectors, ids, metadata=meta, model_fingerprint="sha256:aaa", extra={"kind": "study"})
    out = index.save(tmp_path / "idx")
    assert sorted(p.name for p in out.iterdir()) == ["index.faiss", "index.json", "metadata.parquet"]
    header = json.loads((out / "index.json").read_text())
    assert header["dim"] == 32 and header["count"] == 600 and header["metric"] == "inner_product"
    assert header["model_fingerprint"] == "sha256:aaa" and header["factory"] == "Flat" and header["rvl_version"]
    loaded = EmbeddingIndex.load(out, model_fingerprint="sha256:aaa", dim=32)
    np.testing.assert_array_equal(loaded.search(vectors[:5], 4)[1], index.search(vectors[:5], 4)[1])
    assert loaded.metadata.loc[ids[3], "image_paths"].tolist() == ["img3_a.png", "img3_b.png"]
    assert loaded.extra == {"kind": "study"}
    with pytest.raises(IndexMismatchError, match="different model"):
        EmbeddingIndex.load(out, model_fingerprint="sha256:bbb")
    with pytest.raises(IndexMismatchError, match="512-d"):
        EmbeddingIndex.load(out, dim=512)
    # metadata that no longer agrees with the vectors is refused
    meta_path = out / "metadata.parquet"
    pd.read_parquet(meta_path).iloc[:-1].to_parquet(meta_path)
    with pytest.raises(ValueError, match=r"metadata\.parquet: size \d+ bytes, expected"):
        EmbeddingIndex.load(out)
    store._record_checksums(out)  # checksums of the edited files: the cross-file checks still refuse
    with pytest.raises(ValueError, match="inconsistent"):
        EmbeddingIndex.load(out)


def test_crash_mid_save_leaves_previous_index_loadable(tmp_path, data, monkeypatch):
    vectors, ids, meta = data
    old = EmbeddingIndex.build(vectors[:100], ids[:100], metadata=meta[:100])
    old.save(tmp_path / "idx")
    new = EmbeddingIndex.build(vectors, ids, metadata=meta)

    # 1) crash while writing the files of the new version
    def broken_write(*args, **kwargs):
        raise OSError("disk full")
    with monkeypatch.context() as m:
        m.setattr(faiss, "write_index", broken_write)
        with pytest.raises(OSError):
            new.save(tmp_path / "idx")
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 100
    assert not list(tmp_path.glob(".idx.tmp-*"))

    # 2) crash between "move old aside" and "move new in": the old version is found and loaded
    real_rename = os.rename
    calls = []

    def rename_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)
    with monkeypatch.context() as m:
        m.setattr(store.os, "rename", rename_then_die)
        with pytest.raises(KeyboardInterrupt):
            new.save(tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 100
    new.save(tmp_path / "idx")  # the next save succeeds and cleans the leftovers
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 600
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_sigkill_during_saves_never_corrupts(tmp_path):
    """A real process killed at a random moment while saving in a loop: the folder always loads."""
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from rvl.retrieval import EmbeddingIndex
        rng = np.random.default_rng(0)
        out = {str(tmp_path / "idx")!r}
        for i in range(1000):
            n = 2000 + i
            EmbeddingIndex.build(rng.standard_normal((n, 64)).astype("float32"), np.arange(n)).save(out)
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(4):  # let a few saves complete, then kill in the middle of later ones
        proc.stdout.readline()
    proc.kill()
    proc.wait()
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert len(loaded) >= 2003 and len(loaded.metadata) == len(loaded)


def test_patient_and_date_filters_return_k_when_k_exist(data):
    vectors, ids, meta = data
    for factory in ("Flat", "HNSW16"):
        index = EmbeddingIndex.build(vectors, ids, factory=factory, metadata=meta)
        query = vectors[7:8]
        # prior studies of patient p7 before 2016-01-01
        allowed, excluded = filter_ids(index.metadata, patient_id="p7", before="2016-01-01")
        mask = (meta.patient_id == "p7") & (pd.to_datetime(meta.study_date) < "2016-01-01")
        assert sorted(allowed.tolist()) == sorted(ids[mask.to_numpy()].tolist()) and excluded is None
        scores, found = search_filtered(index, query, k=50, patient_id="p7", before="2016-01-01")
        n_allowed = int(mask.sum())
        assert 0 < n_allowed < 50 and (found[0] >= 0).sum() == n_allowed
        assert set(found[0, :n_allowed]) == set(ids[mask.to_numpy()])
        # exclude the query's patient: k results, none of them from p7, best ones first
        scores, found = search_filtered(index, query, k=20, exclude_patient="p7")
        p7_ids = set(ids[(meta.patient_id == "p7").to_numpy()])
        assert (found[0] >= 0).all() and not (set(found[0]) & p7_ids)
        if factory == "Flat":
            others = ~(meta.patient_id == "p7").to_numpy()
            expected = brute_force(query, vectors[others], ids[others], 20)[0]
            np.testing.assert_array_equal(found[0], expected)
    with pytest.raises(ValueError, match="invalid date"):
        filter_ids(meta.assign(id=ids), before="yesterday")


@pytest.fixture(scope="module")
def built_indexes(tmp_path_factory):
    """A phantom collection, an untrained tiny model, and its study + report indexes built through the CLI."""
    from rvl.cli import main
    from rvl.model import create_model
    from rvl.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("cli")
    generate_phantoms(root / "ph", 40, size=64, seed=2, progress=False)
    model_dir = create_model("rvl-tiny").save_pretrained(root / "model")
    manifest = root / "ph" / "manifest.parquet"
    for kind in ("study", "report"):
        assert main(["index", "build", "--model", str(model_dir), "--data", str(manifest), "--out",
                     str(root / kind), "--kind", kind]) == 0
    return root, model_dir, manifest


def test_index_build_cli_writes_consistent_folders(built_indexes):
    from rvl.constants import CHEXPERT_LABELS

    root, model_dir, manifest = built_indexes
    frame = pd.read_parquet(manifest)
    study = EmbeddingIndex.load(root / "study")
    assert len(study) == len(frame) and study.extra["kind"] == "study" and study.extra["model_dir"] == str(model_dir)
    assert set(CHEXPERT_LABELS) <= set(study.metadata.columns)
    assert sorted(study.metadata["study_id"]) == sorted(frame["study_id"])
    norms = np.linalg.norm(study.reconstruct(study.ids), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_search_cli_queries_and_filters(built_indexes, capsys):
    from rvl.cli import main

    from rvl.data import read_manifest

    root, model_dir, manifest = built_indexes
    frame = read_manifest(manifest).reset_index(drop=True)  # image paths made absolute
    multi = frame.groupby("patient_id").filter(lambda g: len(g) >= 2).sort_values("study_date")
    patient = multi["patient_id"].iloc[0]
    latest = multi[multi.patient_id == patient].iloc[-1]

    def search(*argv):
        assert main(["search", "--index", str(root / "study"), *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["results"]

    hits = search("--study-id", latest.study_id, "-k", "5")
    assert len(hits) == 5 and latest.study_id not in [h["study_id"] for h in hits]  # never the query itself
    priors = search("--study-id", latest.study_id, "--patient", patient, "--before", latest.study_date, "-k", "10")
    expected = frame[(frame.patient_id == patient) & (frame.study_date < latest.study_date)]
    assert sorted(h["study_id"] for h in priors) == sorted(expected.study_id)
    others = search("--study-id", latest.study_id, "--exclude-patient", patient, "-k", "8")
    assert len(others) == 8 and all(h["patient_id"] != patient for h in others)
    images = [str(p) for p in frame.image_paths.iloc[0]]
    by_image = search("--image", *images, "--views", *frame.view_positions.iloc[0], "-k", "1")
    assert by_image[0]["study_id"] == frame.study_id.iloc[0]  # the same views embed to the indexed study
    assert main(["search", "--index", str(root / "report"), "--text", "left pleural effusion", "-k", "3",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "report" and len(result["results"]) == 3 and "report" in result["results"][0]
    # a different model is refused with a clear message
    from rvl.model import create_model

    other = create_model("rvl-tiny", embed_dim=16).save_pretrained(root / "other_model")
    assert main(["search", "--index", str(root / "study"), "--text", "x", "--model", str(other)]) == 2
    assert "different model" in capsys.readouterr().err
