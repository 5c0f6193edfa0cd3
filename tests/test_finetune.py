"""``rvl finetune``: patient subsets, targets and losses, CutMix / Cut&Remain, exact resume, the summary files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rvl.finetune.losses import label_targets, masked_loss, positive_weights
from rvl.finetune.subsets import draw_patient_subset, read_subset, subset_file, subset_hash, write_subset

LABELS = ["No Finding", "Cardiomegaly", "Edema", "Support Devices"]  # positives in train and test of the fixture
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """90 studies at 64 px (seed 4: each of LABELS has positives in both train and test)."""
    from rvl.phantoms import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("ft-phantoms"), 90, size=64, seed=4, progress=False)


@pytest.fixture(scope="module")
def cache(phantoms, tmp_path_factory) -> Path:
    from rvl.data import prepare

    out = tmp_path_factory.mktemp("ft-cache")
    prepare(phantoms, out, size=64, workers=0, progress=False)
    return out


def _train_frame(phantoms: Path) -> pd.DataFrame:
    frame = pd.read_parquet(phantoms)
    return frame[frame["split"] == "train"].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ subsets
def test_subsets_are_by_patient_reproducible_and_stratified(phantoms, tmp_path):
    frame = _train_frame(phantoms)
    patients = sorted(frame["patient_id"].unique())
    small = draw_patient_subset(frame, LABELS, 0.01, seed=0)
    assert small == draw_patient_subset(frame, LABELS, 0.01, seed=0)  # identical runs, identical lists
    assert set(small) <= set(patients) and len(small) == len(set(small))
    chosen = frame[frame["patient_id"].isin(small)]
    for label in LABELS:  # stratified: every label has a positive study even at 1 %
        assert (chosen[label] == 1).any(), label
    assert len(small) <= len(LABELS) + 1  # ceil(1 % of patients) plus at most one patient per label
    other_seeds = {tuple(draw_patient_subset(frame, LABELS, 0.3, seed=s)) for s in range(4)}
    assert len(other_seeds) > 1
    assert len(draw_patient_subset(frame, LABELS, 0.3, seed=0)) >= int(np.ceil(0.3 * len(patients)))
    assert draw_patient_subset(frame, LABELS, 1.0, seed=5) == patients

    path = subset_file(tmp_path, 0.01, 0)
    assert path.name == "patients_0.01_seed0.txt"
    digest = write_subset(path, small)
    assert read_subset(path) == small and digest == subset_hash(small) == write_subset(path, small)
    with pytest.raises(ValueError, match="different patient list"):
        write_subset(path, small[:-1] or ["someone-else"])


def test_stratification_finds_the_one_rare_patient():
    rows = [{"patient_id": f"p{i:03d}", "Edema": 0.0, "Cardiomegaly": 1.0 if i % 2 else 0.0} for i in range(200)]
    rows.append({"patient_id": "p150", "Edema": 1.0, "Cardiomegaly": 0.0})  # a second study of one patient
    frame = pd.DataFrame(rows)
    for seed in range(3):
        subset = draw_patient_subset(frame, ["Edema", "Cardiomegaly"], 0.01, seed)
        assert "p150" in subset and len(subset) == 2  # ceil(2 of 200) = 2, the rare one included
    with pytest.raises(ValueError, match="no positive training study"):
        draw_patient_subset(frame.assign(Edema=0.0), ["Edema"], 0.1, 0)
    with pytest.raises(ValueError, match="fraction"):
        draw_patient_subset(frame, ["Edema"], 0.0, 0)


# ------------------------------------------------------------------------------------------------ targets, losses
def test_uncertain_and_blank_policies():
    values = np.array([[1.0, 0.0, -1.0, np.nan]])
    t, w = label_targets(values, "ignore", "negative")
    assert t.tolist() == [[1, 0, 0, 0]] and w.tolist() == [[1, 1, 0, 1]]
    t, w = label_targets(values, "ones", "ignore")
    assert t.tolist() == [[1, 0, 1, 0]] and w.tolist() == [[1, 1, 1, 0]]
    t, w = label_targets(values, "zeros", "negative")
    assert t.tolist() == [[1, 0, 0, 0]] and w.tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="not 1, 0, -1"):
        label_targets(np.array([[2.0]]))
    pw = positive_weights(np.array([[1, 0], [0, 0], [0, 1], [0, 0]], np.float32), np.ones((4, 2), np.float32))
    assert pw.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("kind", ["bce", "asl", "focal"])
def test_each_loss_is_masked_and_pulls_towards_targets(kind):
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    targets = torch.randint(0, 2, (6, 3)).float()
    weights = torch.ones(6, 3)
    weights[0, 1] = 0.0
    loss = masked_loss(kind, logits, targets, weights)
    loss.backward()
    assert logits.grad[0, 1] == 0  # an ignored label does not move the classifier
    assert (logits.grad[weights > 0] != 0).all()
    # the gradient points the logits towards the targets: a small step lowers the loss
    stepped = (logits - 0.5 * logits.grad).detach()
    assert masked_loss(kind, stepped, targets, weights) < loss
    # changing an ignored entry's target changes nothing
    other = targets.clone()
    other[0, 1] = 1 - other[0, 1]
    assert torch.allclose(masked_loss(kind, logits, other, weights), loss)


def test_loss_values_match_their_definitions():
    import torch.nn.functional as F
    from torchvision.ops import sigmoid_focal_loss

    from rvl.finetune.losses import _asymmetric

    torch.manual_seed(1)
    logits, targets, weights = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float(), torch.ones(5, 4)
    pos_weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    assert torch.allclose(masked_loss("bce", logits, targets, weights, pos_weight), expected)
    assert torch.allclose(masked_loss("focal", logits, targets, weights),
                          sigmoid_focal_loss(logits, targets, reduction="mean"))
    # ASL without focusing and margin is plain BCE
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(_asymmetric(logits, targets, gamma_neg=0.0, gamma_pos=0.0, clip=0.0), bce, atol=1e-5)
    # ... and with its defaults it weighs easy negatives down much more than easy positives
    easy = torch.tensor([[-4.0, 4.0]])
    per_entry = _asymmetric(easy, torch.tensor([[0.0, 1.0]]))
    plain = F.binary_cross_entropy_with_logits(easy, torch.tensor([[0.0, 1.0]]), reduction="none")
    assert (per_entry / plain)[0, 0] < (per_entry / plain)[0, 1]
    with pytest.raises(ValueError, match="loss must be"):
        masked_loss("hinge", logits, targets, weights)


# ------------------------------------------------------------------------------------------------ augmentations
def test_cutmix_mixes_multi_hot_labels_by_pasted_area():
    from rvl.finetune.augment import StudyCutMix

    batch = 4
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1, 1).expand(batch, 2, 3, 32, 32).clone()
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    weights = torch.ones(batch, 3)
    weights[1, 2] = 0.0
    mixed, t, w, lam = StudyCutMix(alpha=1.0)(images.clone(), targets.clone(), weights.clone(), seed=3)
    assert 0.0 < lam < 1.0
    for i in range(batch):
        partner = batch - 1 - i
        from_partner = (mixed[i] == partner).float().mean().item()
        assert from_partner == pytest.approx(1 - lam, abs=1e-6)  # the pasted area is 1 - lam of every view
        assert torch.allclose(t[i], lam * targets[i] + (1 - lam) * targets[partner])
    assert w[1, 2] == 0 and w[2, 2] == 0 and w.sum() == batch * 3 - 2  # ignored in either study: ignored
    again = StudyCutMix(alpha=1.0)(images.clone(), targets.clone(), weights.clone(), seed=3)
    assert torch.equal(again[0], mixed) and again[3] == lam  # seeded per step: exact resume
    assert StudyCutMix(alpha=0.0)(images.clone(), targets, weights, seed=3)[3] == 1.0


def test_cut_remain_keeps_only_the_finding_boxes(cache):
    from rvl.finetune.augment import CutRemainStudies, remain_boxes

    square = np.full((10, 10), 200, np.uint8)
    kept = remain_boxes(square, [[0.2, 0.3, 0.5, 0.6]])
    assert (kept[3:6, 2:5] == 200).all() and kept.sum() == 200 * 9

    labels = ["Cardiomegaly", "Pleural Effusion", "Support Devices", "Atelectasis", "Lung Lesion", "Consolidation",
              "Edema", "Pneumothorax"]
    plain = CutRemainStudies(cache, split="train", max_views=2, train=False, labels=labels)
    cut = CutRemainStudies(cache, split="train", max_views=2, train=False, labels=labels, cut_remain=1.0)
    checked = untouched = 0
    for i in range(len(plain)):
        boxes = json.loads(plain.frame["finding_boxes"].iloc[i])
        for j in range(len(boxes)):
            before, after = plain._study_images(i, [j])[0], cut._study_images(i, [j])[0]
            keep = cut._boxes_to_keep(i, j)
            if not keep:
                assert np.array_equal(before, after)
                untouched += 1
                continue
            assert np.array_equal(after, remain_boxes(before, keep))
            assert after.sum() < before.sum() and (after[before == 0] == 0).all()
            checked += 1
    assert checked > 0 and untouched > 0 and cut.cut_count == checked
    # an image with a positive label that has no box there is never cut (its finding would be cut away)
    values = plain.frame[labels].to_numpy(dtype=float, na_value=np.nan)
    for i in range(len(plain)):
        boxed = {b.get("label") for view in json.loads(plain.frame["finding_boxes"].iloc[i]) for b in view or []}
        if any(v == 1.0 and name not in boxed for name, v in zip(labels, values[i])):
            assert all(not cut._boxes_to_keep(i, j) for j in range(len(plain.frame["image_paths"].iloc[i])))


# ------------------------------------------------------------------------------------------------ training
def _settings(**overrides):
    from rvl.finetune.trainer import FinetuneSettings

    values = {"labels": LABELS, "model": "rvl-tiny", "max_steps": 4, "batch_size": 8, "save_every": 2,
              "warmup_steps": 1, "linear_steps": 30, "cpu": True, "cutmix": 1.0, "cut_remain": 0.5}
    values.update(overrides)
    return FinetuneSettings(**values)


class _Crash(RuntimeError):
    pass


class _CrashAfter(torch.utils.data.Dataset):
    """Dies on the first item after ``limit`` items: a run killed between two steps."""

    def __init__(self, subset, limit: int):
        self.subset, self.limit, self.served = subset, limit, 0
        self.dataset, self.rows = subset.dataset, subset.rows

    def set_epoch(self, epoch):
        self.subset.set_epoch(epoch)

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, index):
        self.served += 1
        if self.served > self.limit:
            raise _Crash("killed")
        return self.subset[index]


@pytest.mark.slow
def test_full_finetuning_resumes_exactly(cache, tmp_path):
    from rvl.finetune.classifier import StudyClassifier, resolve_init
    from rvl.finetune.grid import _datasets
    from rvl.finetune.trainer import PatientSubset, train_full

    settings = _settings()
    patients = draw_patient_subset(_train_frame_of_cache(cache), LABELS, 0.5, seed=0)

    def fresh(run_dir):
        encoder = resolve_init("scratch", "rvl-tiny", seed=0)
        subset = PatientSubset(_datasets(str(cache), encoder, settings, "train", True, seed=0), patients)
        return StudyClassifier(encoder, len(LABELS), seed=0), subset

    classifier, subset = fresh(tmp_path / "straight")
    straight = train_full(classifier, subset, settings, 0, tmp_path / "straight", resume=False)["model"]
    classifier, subset = fresh(tmp_path / "killed")
    # dies after the step-2 checkpoint (Accelerate's loader fetches one batch ahead: batch 4 is read before step 3)
    with pytest.raises(_Crash):
        train_full(classifier, _CrashAfter(subset, 3 * settings.batch_size), settings, 0, tmp_path / "killed", False)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step_00000002"]
    classifier, subset = fresh(tmp_path / "killed")
    result = train_full(classifier, subset, settings, 0, tmp_path / "killed", resume=True)
    assert result["steps"] == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), result["model"].state_dict().items()):
        assert torch.equal(a, b), name


def _train_frame_of_cache(cache: Path) -> pd.DataFrame:
    from rvl.data import StudyDataset

    return StudyDataset(cache, split="train", max_views=1).frame


@pytest.mark.slow
def test_grid_writes_summary_files_and_resumes(cache, tmp_path):
    from rvl.cli import main
    from rvl.metrics import bootstrap_auc

    out = tmp_path / "FT"
    argv = ["finetune", "--data", str(cache), "--init", "scratch", "--model", "rvl-tiny", "--mode", "linear", "full",
            "--label-fraction", "0.3", "1.0", "--seeds", "0", "1", "--labels", *LABELS, "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "8", "--linear-steps", "20", "--bootstrap", "50", "--cam", "1",
            "--cpu", "--loss", "asl", "--pos-weight", "auto"]
    assert main(argv) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 * 2 * 2  # mode x fraction x seed
    assert set(summary["mode"]) == {"linear", "full"} and set(summary["seed"]) == {0, 1}
    for _, row in summary.iterrows():
        patients = read_subset(subset_file(out, row["fraction"], row["seed"]))
        assert row["subset_hash"] == subset_hash(patients) and row["n_patients"] == len(patients)
        predictions = pd.read_csv(out / "predictions" / f"{row['run']}.csv")
        scores = predictions[[f"score:{label}" for label in LABELS]].to_numpy()
        targets = predictions[[f"target:{label}" for label in LABELS]].to_numpy()
        recomputed = bootstrap_auc(scores, targets, n_bootstrap=50, labels=LABELS)["macro"]["auc"]
        assert recomputed == pytest.approx(row["macro_auc"], abs=1e-5)  # any AUC can be recomputed from the files
        result = json.loads((out / "runs" / row["run"] / "result.json").read_text())
        assert result["cam"]["pointing_game"]["n"] > 0 and len(result["cam"]["overlays"]) == 1
        assert Path(result["cam"]["overlays"][0]).is_file()
    markdown = (out / "summary.md").read_text()
    linear_hash = summary.loc[summary["mode"] == "linear", "settings"].iloc[0]
    assert f"| scratch | linear | none | {linear_hash} |" in markdown
    assert "30 % labels" in markdown and "100 % labels" in markdown
    assert (out / "auc_vs_fraction.png").stat().st_size > 0
    # finished runs are skipped on --resume; without it the folder is refused
    assert main(argv + ["--resume"]) == 0
    assert pd.read_csv(out / "summary.csv").equals(summary)
    proc = subprocess.run([sys.executable, "-m", "rvl", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_rejects_bad_input_clearly(cache, tmp_path):
    base = [sys.executable, "-m", "rvl", "finetune", "--data", str(cache), "--init", "scratch", "--output-dir",
            str(tmp_path / "FT")]
    proc = subprocess.run(base + ["--labels", "Cardiomegally"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Cardiomegally" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(base[:-4] + ["--init", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "FT"),
                                       "--labels", "Edema"], capture_output=True, text=True)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_layer_decay_groups_cover_the_image_side_once():
    from rvl.finetune.classifier import StudyClassifier, resolve_init

    classifier = StudyClassifier(resolve_init("scratch", "rvl-demo", seed=0), 3, seed=0)  # timm ResNet tower
    groups = classifier.image_parameter_groups(lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in classifier.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    assert not any(StudyClassifier.is_image_side(n) is False and p.requires_grad
                   for n, p in classifier.encoder.named_parameters())  # text tower and decoder stay frozen
    head_lr = {g["lr"] for g in groups if any(p is classifier.head.weight for p in g["params"])}
    stem = classifier.encoder.clip.visual.trunk.conv1[0].weight
    stem_lr = {g["lr"] for g in groups if any(p is stem for p in g["params"])}
    assert head_lr == {1e-3} and max(stem_lr) < 1e-3 * 0.5 ** 2  # the deeper from the head, the smaller the lr
    flat = classifier.image_parameter_groups(lr=1e-3, weight_decay=0.05, layer_decay=None)
    assert {g["lr"] for g in flat} == {1e-3}


def test_init_takes_a_public_open_clip_model(tmp_path):
    """--init local-dir:… (an unmodified open_clip model) gives an encoder whose towers hold its weights."""
    import safetensors.torch

    from public_models import open_clip_folder
    from rvl.finetune.classifier import init_key, resolve_init

    folder = open_clip_folder(tmp_path / "public")
    encoder = resolve_init(f"local-dir:{folder}", seed=0)
    state = safetensors.torch.load_file(str(folder / "open_clip_model.safetensors"))
    assert torch.equal(encoder.clip.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    assert init_key("hf-hub:acme/tiny-clip") == init_key("hf-hub:acme/tiny-clip") != init_key("scratch")
    with pytest.raises(ValueError, match="not a folder, file, hf-hub: id or a pretrained tag"):
        resolve_init(str(tmp_path / "missing"))
