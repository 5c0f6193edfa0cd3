"""Images that cannot be radiographs (tiny or flat) are refused for zero-shot and index building, with an override."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rvl.cli import main as rvl_main
from rvl.data.io import DegenerateImageError, check_not_degenerate


@pytest.mark.parametrize("shape,value,message", [((1, 1), None, "1 x 1 px is smaller than the 32 px minimum"),
                                                 ((31, 200), None, "200 x 31 px is smaller"),
                                                 ((64, 64), 0.5, "every pixel has the same value")])
def test_degenerate_images_are_named(shape, value, message):
    image = np.full(shape, value, np.float32) if value is not None else np.linspace(0, 1, np.prod(shape)).reshape(
        shape).astype(np.float32)
    with pytest.raises(DegenerateImageError, match=f"x.png: {message}.*; use --force"):
        check_not_degenerate(image, "x.png", override="use --force")


def test_a_real_looking_image_passes():
    check_not_degenerate(np.random.default_rng(0).random((32, 40)).astype(np.float32), "ok.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rvl.model import create_model
    from rvl.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("degenerate")
    generate_phantoms(root / "ph", 6, size=64, seed=1, progress=False)
    Image.fromarray(np.array([[200]], np.uint8)).save(root / "one_pixel.png")
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(root / "flat.png")
    model_dir = create_model("rvl-tiny").save_pretrained(root / "model")
    return root, model_dir


def test_zeroshot_refuses_a_1x1_png_unless_allowed(setup, capsys):
    root, model_dir = setup
    for name in ("one_pixel.png", "flat.png"):
        code = rvl_main(["zeroshot", "--model", str(model_dir), "--images", str(root / name), "--json"])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "" and "Traceback" not in captured.err
        assert f"{root / name}:" in captured.err and "--allow-degenerate" in captured.err
    code = rvl_main(["zeroshot", "--model", str(model_dir), "--images", str(root / "one_pixel.png"), "--json",
                     "--allow-degenerate"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)[0]["probabilities"]) == 14
    code = rvl_main(["zeroshot", "--model", str(model_dir), "--study", "--images",
                     str(next((root / "ph" / "images").rglob("*.png"))), str(root / "flat.png"), "--json"])
    assert code == 2 and "flat.png: every pixel" in capsys.readouterr().err


def test_index_build_refuses_skips_or_allows_degenerate_views(setup, capsys):
    pytest.importorskip("faiss")
    from rvl.retrieval import EmbeddingIndex

    root, model_dir = setup
    frame = pd.read_parquet(root / "ph" / "manifest.parquet")
    frame.at[0, "image_paths"] = [str(root / "one_pixel.png")]  # a study whose only view is degenerate
    frame.at[0, "view_positions"] = ["PA"]
    frame.at[1, "image_paths"] = [str(root / "flat.png"), *frame.at[1, "image_paths"][1:]]
    manifest = root / "ph" / "mixed.parquet"  # image paths are relative to the manifest folder
    frame.to_parquet(manifest)
    build = ["index", "build", "--model", str(model_dir), "--data", str(manifest), "--device", "cpu"]

    assert rvl_main([*build, "--out", str(root / "refused")]) == 2
    err = capsys.readouterr().err
    assert "one_pixel.png: 1 x 1 px" in err and "--degenerate skip" in err and "Traceback" not in err
    assert not (root / "refused").exists()

    assert rvl_main([*build, "--out", str(root / "skipped"), "--degenerate", "skip"]) == 0
    skipped = EmbeddingIndex.load(root / "skipped")
    assert frame.at[0, "study_id"] not in set(skipped.metadata["study_id"]) and len(skipped) == len(frame) - 1
    assert rvl_main([*build, "--out", str(root / "allowed"), "--degenerate", "allow"]) == 0
    assert len(EmbeddingIndex.load(root / "allowed")) == len(frame)


def test_a_tiny_original_is_caught_behind_its_resized_square_in_a_cache(setup, capsys):
    """A 12 x 12 px original with variation becomes a normal-looking 64 px square in the cache: the cache records
    each view's original size, so index building from the cache still refuses it (or skips it when asked)."""
    pytest.importorskip("faiss")
    from rvl.data import StudyDataset, prepare
    from rvl.retrieval import EmbeddingIndex

    root, model_dir = setup
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "tiny.png")
    frame = pd.read_parquet(root / "ph" / "manifest.parquet")
    frame.at[2, "image_paths"] = [str(root / "tiny.png")]
    frame.at[2, "view_positions"] = ["PA"]
    frame.to_parquet(root / "ph" / "tiny.parquet")
    cache = root / "tiny-cache"
    prepare(root / "ph" / "tiny.parquet", cache, size=64, workers=0, progress=False)
    square = StudyDataset(cache, train=False)._study_images(2, [0])[0]
    assert square.std() > 0  # nothing in the square itself shows the original was tiny
    with pytest.raises(DegenerateImageError, match=r"tiny.png: 12 x 12 px \(original\) is smaller than the 32 px"):
        StudyDataset(cache, train=False, degenerate="refuse")[2]

    build = ["index", "build", "--model", str(model_dir), "--data", str(cache), "--device", "cpu"]
    assert rvl_main([*build, "--out", str(root / "tiny-refused")]) == 2
    assert "tiny.png: 12 x 12 px (original)" in capsys.readouterr().err
    assert rvl_main([*build, "--out", str(root / "tiny-skipped"), "--degenerate", "skip"]) == 0
    assert frame.at[2, "study_id"] not in set(EmbeddingIndex.load(root / "tiny-skipped").metadata["study_id"])
