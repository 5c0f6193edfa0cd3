"""zeroshot, heatmap, index build, search and evaluate on an unmodified open_clip model (no rvl training)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from public_models import open_clip_folder, put_in_hub_cache
from rvl.cli import main as rvl_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rvl.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("public")
    generate_phantoms(root / "ph", 24, size=64, seed=2, fmt="png", progress=False)
    clip = open_clip_folder(root / "tiny-clip", seed=4)
    put_in_hub_cache("acme/tiny-clip-cmds", clip)
    return root, clip


def _first_image(root: Path) -> str:
    import pandas as pd

    frame = pd.read_parquet(root / "ph" / "manifest.parquet")
    return str(Path(root / "ph") / frame["image_paths"].iloc[0][0])


@pytest.mark.parametrize("spec", ["local-dir", "folder", "hf-hub"])
def test_zeroshot_single_image_on_open_clip_model(setup, spec, capsys):
    root, clip = setup
    model = {"local-dir": f"local-dir:{clip}", "folder": str(clip), "hf-hub": "hf-hub:acme/tiny-clip-cmds"}[spec]
    assert rvl_main(["zeroshot", "--model", model, "--images", _first_image(root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    probs = result[0]["probabilities"] if isinstance(result, list) else result["probabilities"]
    values = np.array(list(probs.values()), float)
    assert len(values) >= 13 and np.all((values >= 0) & (values <= 1))


def test_heatmap_index_search_and_evaluate_on_open_clip_model(setup, tmp_path, capsys):
    from PIL import Image

    root, clip = setup
    model = f"local-dir:{clip}"
    out_png = tmp_path / "heat.png"
    assert rvl_main(["heatmap", "--model", model, "--image", _first_image(root), "--text", "left pleural effusion",
                     "--out", str(out_png)]) == 0
    assert Image.open(out_png).size[0] >= 64
    index_dir = tmp_path / "idx"
    assert rvl_main(["index", "build", "--model", model, "--data", str(root / "ph" / "manifest.parquet"),
                     "--out", str(index_dir), "--device", "cpu"]) == 0
    assert json.loads((index_dir / "index.json").read_text())["count"] >= 20
    capsys.readouterr()
    assert rvl_main(["search", "--index", str(index_dir), "--text", "large right pleural effusion", "-k", "3",
                     "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits if isinstance(hits, list) else hits["results"]) == 3
    # an index built by one model refuses queries embedded by another
    other = open_clip_folder(tmp_path / "other", seed=9)
    assert rvl_main(["search", "--index", str(index_dir), "--text", "effusion", "--model", f"local-dir:{other}",
                     "--device", "cpu"]) == 2
    assert "different model" in capsys.readouterr().err
    metrics = tmp_path / "eval"
    assert rvl_main(["evaluate", "--model", model, "--data", str(root / "ph" / "manifest.parquet"), "--split", "train",
                     "--out", str(metrics), "--bootstrap", "20", "--device", "cpu"]) == 0
    assert "zeroshot_prompt" in json.loads((metrics / "metrics.json").read_text())
