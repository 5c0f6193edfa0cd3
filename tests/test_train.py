"""``rvl pretrain`` end to end on tiny phantoms: export, exact resume after SIGKILL, NaN stop, bad images, config."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
# one intra-op thread: on a shared 2-core machine spinning OpenMP threads cost far more than they bring
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training runs use one intra-op thread too (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from rvl.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, 40, size=64, seed=0, fmt="png", progress=False)
    return out / "manifest.parquet"


def pretrain_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rvl", "pretrain", "--data", str(data), "--output-dir", str(out), "--model",
            "rvl-tiny", "--max-steps", "9", "--batch-size", "8", "--save-every", "3", "--seed", "3",
            "--eval-every", "100", "--log-with", "none", "--sentence-sampling", "0.5", "--cpu", *extra]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(out / "model" / "open_clip_model.safetensors"))
    weights.update({f"rvl.{k}": v for k, v in load_file(str(out / "model" / "rvl" / "rvl_heads.safetensors")).items()})
    return weights


def test_views_never_duplicated_and_all_used(phantoms):
    """Real StudyDataset on phantoms: each real view is a distinct image, slots are filled without replacement."""
    from rvl.data import StudyDataset

    ds = StudyDataset(phantoms, split="train", max_views=3, train=True, seed=0)
    for i in range(len(ds)):
        item = ds[i]
        n_real = int(item["view_mask"].sum())
        assert n_real == min(len(ds.frame["image_paths"].iloc[i]), 3)
        assert not item["view_mask"][n_real:].any()
        real = item["images"][:n_real].flatten(1)
        for a in range(n_real):
            for b in range(a + 1, n_real):
                assert not torch.equal(real[a], real[b])


@pytest.fixture(scope="module")
def full_run(phantoms, tmp_path_factory) -> Path:
    """An uninterrupted 9-step run (gradient accumulation 2), validated and exported at the end."""
    full = tmp_path_factory.mktemp("full")
    subprocess.run(pretrain_cmd(phantoms, full, "--grad-accum", "2"), env=ENV, check=True, capture_output=True)
    return full


def test_resume_after_sigkill_matches_uninterrupted_run(phantoms, full_run, tmp_path):
    """30 training studies / batch 8 = 3 batches per epoch; with accumulation 2 an epoch is 2 optimizer steps, so
    the checkpoint of step 3 sits after micro-batch 5, mid-epoch: the restart must skip 2 batches of epoch 2 and
    resume the accumulation phase, dropout seeds and view sampling exactly where they were."""
    full = full_run
    killed = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(phantoms, killed, "--grad-accum", "2"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_00000003").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step_00000003").exists()
    assert not (killed / "model").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(pretrain_cmd(phantoms, killed, "--grad-accum", "2", "--resume"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = final_weights(full), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    # keep_last=2 step checkpoints, no half-written folders left behind
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step_")] == ["step_00000006", "step_00000009"], names
    assert not [n for n in names if n.startswith(".")], names
    assert "best" in names  # validation at the last step keeps the best state too


def test_export_loads_in_rvl_and_open_clip(full_run):
    import open_clip

    from rvl.model import from_pretrained

    out = full_run
    model = from_pretrained(out / "model").eval()
    assert model.rvl_cfg["fusion"] == "attention"
    assert (out / "checkpoints" / "best").is_dir() and (out / "checkpoints" / "best.json").is_file()
    clip, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{out / 'model'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'model'}")
    text = ["FINDINGS: Moderate cardiomegaly. IMPRESSION: Cardiomegaly."]
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        assert torch.allclose(clip.eval().encode_text(tokenizer(text), normalize=True),
                              model.encode_text(model.tokenizer(text)), atol=1e-5)
        assert torch.allclose(clip.encode_image(images, normalize=True), model.encode_image(images), atol=1e-5)


def test_resume_refuses_an_altered_checkpoint(phantoms, full_run, tmp_path, capsys):
    """A flipped byte in the newest checkpoint stops --resume with the file, both hashes and the fallback."""
    import shutil

    from rvl.cli import main as rvl_main
    from rvl.faults import corrupt
    from rvl.integrity import read_checksums

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    newest = run / "checkpoints" / "step_00000009"
    assert "model.safetensors" in read_checksums(newest)["files"]
    corrupt(newest / "model.safetensors", "flip")
    code = rvl_main(pretrain_cmd(phantoms, run, "--grad-accum", "2", "--resume")[3:])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "step_00000009/model.safetensors: content does not match" in err and "expected xxh3_128" in err
    assert "continues from step_00000006" in err


def test_flags_override_yaml_config(tmp_path):
    import argparse

    from rvl.config import config_from_args
    from rvl.train import add_arguments

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 0.01\n  batch_size: 4\ntrain:\n  seed: 7\nmodel:\n  name: rvl-small\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(cfg_file), "--batch-size", "16", "--data", "x",
                                              "--resume", "--caption-weight", "0"]))
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.train.seed, cfg.model.name) == (0.01, 16, 7, "rvl-small")
    assert cfg.data.source == "x" and cfg.train.resume and cfg.objectives.caption_weight == 0.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        config_from_args(parser.parse_args(["--config", str(bad)]))


def test_packaged_training_configs_parse():
    from rvl.config import load_config

    configs = sorted((Path(__file__).parents[1] / "rvl" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_nan_losses_stop_with_last_good_checkpoint(phantoms, tmp_path, monkeypatch):
    """Steps 1-3 fine (checkpoint at 3), then every loss is NaN: skipped with warnings, then a clear stop."""
    from rvl.config import load_config
    from rvl.model.loss import RVLLoss
    from rvl.train import train

    calls = {"n": 0}
    forward = RVLLoss.forward

    def poisoned(self, model_out, labels=None, output_dict=True, **text):
        out = forward(self, model_out, labels, **text)
        calls["n"] += 1
        if calls["n"] > 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(RVLLoss, "forward", poisoned)
    out = tmp_path / "nan"
    cfg = load_config(overrides={"data.source": str(phantoms), "train.output_dir": str(out), "optim.max_steps": 9,
                                 "optim.batch_size": 8, "train.save_every": 3, "train.eval_every": 100,
                                 "train.log_with": "none", "train.max_bad_steps": 2, "train.cpu": True})
    before = None
    with pytest.raises(SystemExit, match=r"2 non-finite losses in a row.*step_00000003"):
        train(cfg)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert before == ["step_00000003"]
    assert (out / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    assert not (out / "model").exists()


def test_unreadable_image_skipped_or_strict(phantoms, tmp_path, caplog):
    import json
    import logging

    import pandas as pd

    from rvl.config import load_config
    from rvl.data.io import ImageReadError
    from rvl.train import train

    frame = pd.read_parquet(phantoms)
    frame["image_paths"] = [[str(Path(p) if Path(p).is_absolute() else phantoms.parent / p) for p in ps]
                            for ps in frame["image_paths"]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    first, second = frame.index[frame["split"] == "train"][:2]
    frame.at[first, "image_paths"] = [str(broken)] * len(frame.at[first, "image_paths"])  # whole study unreadable
    frame.at[second, "image_paths"] = [str(broken)] + list(frame.at[second, "image_paths"][1:])  # one view
    frame.to_parquet(tmp_path / "manifest.parquet")

    def cfg(out: str, strict: bool):
        return load_config(overrides={"data.source": str(tmp_path / "manifest.parquet"), "data.strict": strict,
                                      "train.output_dir": str(tmp_path / out), "optim.max_steps": 4,
                                      "optim.batch_size": 8, "train.save_every": 100, "train.eval_every": 100,
                                      "train.log_with": "none", "train.cpu": True})

    with caplog.at_level(logging.WARNING):
        assert train(cfg("skip", strict=False)) == 0
    assert "broken.png" in caplog.text
    summary = json.loads((tmp_path / "skip" / "train_summary.json").read_text())
    assert summary["skipped_studies"] >= 2 and summary["steps"] == 4
    with pytest.raises(ImageReadError, match="broken.png"):
        train(cfg("strict", strict=True))
