"""The ``rvl finetune`` grid: init x mode x label fraction x seed, each run scored on the held-out patients.

Layout of the output folder ``FT``::

    FT/config.json                              the grid and settings of the last invocation
    FT/subsets/patients_<fraction>_seed<k>.txt  the drawn training patients (shared by every init and mode)
    FT/embeddings/<init>_<views>.npz            frozen study embeddings of the train and test splits (linear probe)
    FT/runs/<run>/result.json                   a finished run (metrics, settings, subset hash); absent = unfinished
    FT/runs/<run>/checkpoints/                  full fine-tuning state (the last one is the trained model)
    FT/predictions/<run>.csv                    per-study test scores and targets
    FT/cam/<run>/*.png                          CAM overlays (--cam K)
    FT/summary.csv, FT/summary.md, FT/auc_vs_fraction.png

A run's folder name holds every setting its result depends on (a hash of them), so a rerun with other settings
never mistakes an old result for its own; a finished run is skipped, an unfinished one resumes (``--resume``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rvl.finetune.classifier import StudyClassifier, init_key, resolve_init
from rvl.finetune.outputs import (adopt_run, clean_temporaries, file_hashes, load_embeddings, read_table,
                                  save_embeddings, seal_outputs, write_result)
from rvl.finetune.subsets import draw_patient_subset, subset_file, write_subset
from rvl.finetune.trainer import FinetuneSettings, PatientSubset, predict, study_features, train_full, train_linear
from rvl.fileio import exclusive_output, write_json_atomic

__all__ = ["run_grid", "run_name"]

logger = logging.getLogger(__name__)
MODES = ("linear", "full")
# settings that do not change a run's result (bookkeeping) and so stay out of its name
_NOT_IN_NAME = ("save_every", "cpu", "mixed_precision")


def run_name(init: str, mode: str, fraction: float, seed: int, settings: FinetuneSettings) -> str:
    """Folder name of one run: readable parts + a hash of the settings this mode's result depends on."""
    relevant = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_IN_NAME}
    if mode == "linear":  # the probe never sees images: augmentation and image-side training settings do not apply
        for key in ("cutmix", "cut_remain", "max_steps", "batch_size", "lr", "head_lr_scale", "warmup_steps",
                    "layer_decay"):
            relevant.pop(key)
    else:
        for key in ("linear_steps", "linear_lr"):
            relevant.pop(key)
    digest = hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{init_key(init)}__{mode}__{settings.augmentations(mode)}__f{fraction:g}__s{seed}__{digest}"


def _datasets(data: str, encoder: Any, settings: FinetuneSettings, split: str, train: bool, seed: int = 0):
    from rvl.finetune.augment import CutRemainStudies

    max_views = 1 if settings.views == "frontal" else int(encoder.rvl_cfg.get("max_views", 2))
    transform = encoder.preprocess_train if train else encoder.preprocess
    # frontal: one view, frontal first, never a random one; study: random view subsets while training
    return CutRemainStudies(data, split=split, max_views=max_views, image_transform=transform,
                            train=train and settings.views == "study", seed=seed,
                            cut_remain=settings.cut_remain if train else 0.0, labels=settings.labels)


def _cached_features(out_dir: Path, init: str, seed: int, encoder: Any, data: str, settings: FinetuneSettings,
                     splits: dict[str, str]) -> tuple[dict[str, dict[str, np.ndarray]], Path]:
    """Frozen study embeddings of the train and test splits, computed once per (init, views) and cached."""
    key = init_key(init) + (f"-seed{seed}" if init == "scratch" else "")  # a scratch encoder differs per seed
    path = out_dir / "embeddings" / f"{key}_{settings.views}.npz"
    cached = load_embeddings(out_dir, path, list(splits))
    if cached is not None:
        return cached, path
    out = {name: study_features(encoder, _datasets(data, encoder, settings, split, train=False),
                                desc=f"embedding {split} ({key})") for name, split in splits.items()}
    save_embeddings(path, out)
    seal_outputs(out_dir, [path.relative_to(out_dir).as_posix()])
    return out, path


def _run_one(data: str, out_dir: Path, init: str, mode: str, fraction: float, seed: int, patients: list[str],
             subset_hash: str, settings: FinetuneSettings, frames: dict[str, Any], resume: bool, cam: int,
             n_bootstrap: int) -> dict[str, Any]:
    from rvl.finetune.results import score_run, write_predictions

    name = run_name(init, mode, fraction, seed, settings)
    run_dir = out_dir / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    encoder = resolve_init(init, settings.model, seed)
    classifier = StudyClassifier(encoder, len(settings.labels), seed)
    train_frame, test_frame = frames["train"], frames["test"]
    feats_path = None
    in_subset = train_frame["patient_id"].astype(str).isin(set(patients)).to_numpy()
    if mode == "linear":
        classifier.freeze_encoder()
        feats, feats_path = _cached_features(out_dir, init, seed, encoder, data, settings,
                                             {"train": "train", "test": "test"})
        if not np.array_equal(feats["train"]["study_id"].astype(str), train_frame["study_id"].astype(str)):
            raise ValueError(f"{out_dir / 'embeddings'}: cached embeddings are of other studies; delete the folder")
        values = train_frame[settings.labels].to_numpy(dtype=np.float64, na_value=np.nan)[in_subset]
        train_info = train_linear(classifier, feats["train"]["features"][in_subset], values, settings, seed)
        import torch

        with torch.no_grad():
            logits = classifier.head(torch.from_numpy(feats["test"]["features"]))
        probs, test_ids = torch.sigmoid(logits).numpy(), [str(s) for s in feats["test"]["study_id"]]
    else:
        train_set = PatientSubset(_datasets(data, encoder, settings, frames["train_split"], True, seed), patients)
        train_info = train_full(classifier, train_set, settings, seed, run_dir, resume)
        classifier = train_info.pop("model").float()
        probs, test_ids = predict(classifier, _datasets(data, encoder, settings, frames["test_split"], False))
    if test_ids != test_frame["study_id"].astype(str).tolist():
        raise RuntimeError("test predictions are not aligned with the test studies (an unreadable study?)")
    metrics = score_run(probs, test_frame, settings.labels, n_bootstrap=n_bootstrap)
    write_predictions(out_dir / "predictions" / f"{name}.csv", probs, test_frame, settings.labels)
    cam_info = None
    if cam:
        from rvl.finetune.cam import pointing_game, write_overlays

        test_set = _datasets(data, classifier.encoder, settings, frames["test_split"], False)
        try:
            cam_info = {"overlays": write_overlays(classifier, test_set, probs, settings.labels, cam,
                                                   out_dir / "cam" / name),
                        "pointing_game": pointing_game(classifier, test_set, settings.labels)}
        except NotImplementedError as err:
            cam_info = {"note": str(err)}
    result = {"run": name, "init": init, "mode": mode, "augment": settings.augmentations(mode), "fraction": fraction,
              "seed": seed, "n_patients": len(patients), "n_studies": int(in_subset.sum()), "subset_hash": subset_hash,
              "settings": dataclasses.asdict(settings), "train": train_info, "metrics": metrics, "cam": cam_info,
              "seconds": round(time.perf_counter() - started, 1),
              "files": file_hashes(out_dir, [out_dir / "predictions" / f"{name}.csv",
                                             *sorted((out_dir / "cam" / name).glob("*.png"))]),
              "inputs": file_hashes(out_dir, [feats_path]) if feats_path else {}}
    write_result(run_dir / "result.json", result)  # last: marks the run finished (sealed: trusted only when intact)
    seal_outputs(out_dir, adopt_run(out_dir, run_dir / "result.json"))
    return result


def run_grid(data: str, out_dir: str | Path, inits: Sequence[str], modes: Sequence[str], fractions: Sequence[float],
             seeds: Sequence[int], settings: FinetuneSettings, resume: bool = False, cam: int = 0,
             n_bootstrap: int = 1000, train_split: str = "train", test_split: str = "test") -> dict[str, Any]:
    """Run every (init, mode, fraction, seed) not finished yet and write the summary files. See the module doc."""
    from accelerate import PartialState

    if PartialState().num_processes > 1:  # every rank would score and write the same files
        raise ValueError("rvl finetune runs its grid in one process (one GPU or the CPU); launch it without "
                         "accelerate launch / torchrun")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per checkpoint file otherwise
    out_dir = Path(out_dir)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"--mode must be linear and/or full, got {unknown}")
    runs_dir = out_dir / "runs"
    with exclusive_output(out_dir / ".finetune.lock", f"the fine-tuning folder {out_dir}"):
        if not resume and runs_dir.is_dir() and any(runs_dir.iterdir()):
            raise ValueError(f"{out_dir} already holds runs: add --resume to finish / extend the grid there, or choose "
                             "a new --output-dir")
        clean_temporaries(out_dir)
        read_table(out_dir)  # a damaged table is refused before anything is trained on top of it
        return _run_grid_locked(data, out_dir, inits, modes, fractions, seeds, settings, resume, cam, n_bootstrap,
                                train_split, test_split)


def _run_grid_locked(data: str, out_dir: Path, inits: Sequence[str], modes: Sequence[str],
                     fractions: Sequence[float], seeds: Sequence[int], settings: FinetuneSettings, resume: bool,
                     cam: int, n_bootstrap: int, train_split: str, test_split: str) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from rvl.data import StudyDataset
    from rvl.finetune.results import write_summary

    runs_dir = out_dir / "runs"
    frames = {"train": StudyDataset(data, split=train_split, max_views=1).frame,
              "test": StudyDataset(data, split=test_split, max_views=1).frame,
              "train_split": train_split, "test_split": test_split}
    overlap = set(frames["train"]["patient_id"].astype(str)) & set(frames["test"]["patient_id"].astype(str))
    if overlap:
        raise ValueError(f"{len(overlap)} patient(s) are in both the {train_split} and {test_split} splits "
                         f"(e.g. {sorted(overlap)[0]}): the held-out patients must be new")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "config.json", {"data": str(data), "inits": list(inits), "modes": list(modes),
                                                "fractions": list(fractions), "seeds": list(seeds),
                                                "settings": dataclasses.asdict(settings)})
    subsets = {}
    for fraction in fractions:
        for seed in seeds:
            patients = draw_patient_subset(frames["train"], settings.labels, fraction, seed)
            subsets[fraction, seed] = (patients, write_subset(subset_file(out_dir, fraction, seed), patients))
    seal_outputs(out_dir, ["config.json", *(subset_file(out_dir, f, s).relative_to(out_dir).as_posix()
                                            for f, s in subsets)])  # checked by write_subset against the draw
    grid = [(i, m, f, s) for i in inits for m in modes for f in fractions for s in seeds]
    done, skipped, adopted = 0, 0, []
    for init, mode, fraction, seed in tqdm(grid, desc="finetune grid", unit="run"):
        finished = runs_dir / run_name(init, mode, fraction, seed, settings) / "result.json"
        if finished.is_file():
            adopted += adopt_run(out_dir, finished)  # refuses a damaged record or file, naming it
            skipped += 1
            continue
        patients, digest = subsets[fraction, seed]
        result = _run_one(data, out_dir, init, mode, fraction, seed, patients, digest, settings, frames, resume,
                          cam, n_bootstrap)
        done += 1
        macro = result["metrics"]["macro"]["auc"]
        tqdm.write(f"{result['run']}: macro AUC {macro:.3f}" if macro is not None else f"{result['run']}: no AUC")
    summary = write_summary(out_dir)
    seal_outputs(out_dir, adopted + [rel for rel in ("summary.csv", "summary.md", "auc_vs_fraction.png")
                                     if (out_dir / rel).is_file()])
    return {**summary, "trained": done, "skipped_finished": skipped}
