"""How fast can an image tower learn the phantom findings? A supervised probe against a pixel baseline.

The contrastive demo is only as good as what the image tower can see. This probe trains the study encoder of a model
config (image tower + view fusion + a linear label head) with label BCE alone for a few hundred steps and reports the
validation AUC per finding, next to a logistic regression on 24x24 average-pooled frontal pixels of the same cache,
fitted in the same run. A tower far below the pixel baseline is the bottleneck (not the data or the text side).

    .venv/bin/python bench/probe_image_tower.py                        # rvl-demo on 1,000 fresh phantom studies
    .venv/bin/python bench/probe_image_tower.py --model rvl-small --cache DIR --steps 300
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from rvl.constants import CHEXPERT_LABELS
from rvl.data import StudyDataset, collate_studies, prepare
from rvl.model.loss import RVLLoss
from rvl.model import create_model
from rvl.phantoms import generate_phantoms

MIN_CLASS = 5  # findings with fewer validation positives or negatives are not scored


def per_label_auc(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC per CheXpert label: positive = 1, negative = 0, uncertain and blank left out."""
    out = {}
    for j, name in enumerate(CHEXPERT_LABELS):
        y = labels[:, j]
        keep = ~np.isnan(y) & (y != -1)
        pos = y[keep] == 1
        if pos.sum() >= MIN_CLASS and (~pos).sum() >= MIN_CLASS:
            out[name] = float(roc_auc_score(pos, scores[keep, j]))
    return out


def pixel_features(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = StudyDataset(cache, split=split, max_views=2, train=False)  # eval order: frontal view first
    feats, labels = [], []
    for batch in torch.utils.data.DataLoader(ds, batch_size=128, collate_fn=collate_studies):
        feats.append(F.adaptive_avg_pool2d(batch["images"][:, 0, :1], 24).flatten(1))
        labels.append(batch["labels"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def pixel_baseline(cache: Path) -> dict[str, float]:
    x_train, y_train = pixel_features(cache, "train")
    x_val, y_val = pixel_features(cache, "validate")
    scores = np.zeros((len(x_val), len(CHEXPERT_LABELS)))
    for j in range(len(CHEXPERT_LABELS)):
        keep = ~np.isnan(y_train[:, j]) & (y_train[:, j] != -1)
        target = y_train[keep, j] == 1
        if target.sum() >= MIN_CLASS and (~target).sum() >= MIN_CLASS:
            clf = LogisticRegression(C=0.1, max_iter=2000).fit(x_train[keep], target)
            scores[:, j] = clf.decision_function(x_val)
    return per_label_auc(scores, y_val)


def probe_tower(model_name: str, cache: Path, steps: int, lr: float, batch_size: int) -> tuple[dict[str, float], float]:
    torch.manual_seed(0)
    model = create_model(model_name, label_head=True)
    train = StudyDataset(cache, split="train", max_views=2, image_transform=model.preprocess_train, train=True)
    val = StudyDataset(cache, split="validate", max_views=2, image_transform=model.preprocess, train=False)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate_studies,
                                         drop_last=True)
    params = [p for n, p in model.named_parameters() if not n.startswith(("clip.text", "caption_decoder"))]
    optimizer = torch.optim.AdamW(params, lr, weight_decay=0.05)
    started, step = time.perf_counter(), 0
    while step < steps:
        for batch in loader:
            study = model.encode_study(batch["images"], batch["view_mask"], batch["view_types"], normalize=False)
            loss = RVLLoss.label_bce(model.label_head(study), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    seconds = time.perf_counter() - started
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(val, batch_size=64, collate_fn=collate_studies):
            study = model.encode_study(batch["images"], batch["view_mask"], batch["view_types"], normalize=False)
            scores.append(model.label_head(study))
            labels.append(batch["labels"])
    return per_label_auc(torch.cat(scores).numpy(), torch.cat(labels).numpy()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rvl-demo", help="packaged model config or JSON path")
    parser.add_argument("--cache", help="prepared cache (default: generate --studies phantoms and prepare them)")
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="rvl-probe-") as tmp:
        cache = Path(args.cache) if args.cache else None
        if cache is None:
            manifest = generate_phantoms(Path(tmp) / "phantoms", args.studies, size=160, seed=0, progress=False)
            cache = Path(tmp) / "cache"
            prepare(manifest, cache, size=128, progress=False)
        baseline = pixel_baseline(cache)
        tower, seconds = probe_tower(args.model, cache, args.steps, args.lr, args.batch_size)
    print(f"\nimage-tower probe: {args.model}, {args.steps} steps x {args.batch_size} studies in {seconds:.0f} s, "
          f"label BCE only; baseline: logistic regression on 24x24 pooled frontal pixels (same cache, same run)\n")
    print(f"{'finding':28s} {'tower AUC':>10s} {'pixel LR AUC':>13s}")
    for name in baseline:
        print(f"{name:28s} {tower.get(name, float('nan')):10.3f} {baseline[name]:13.3f}")
    names = [n for n in baseline if n in tower]
    macro_tower, macro_pixels = np.mean([tower[n] for n in names]), np.mean([baseline[n] for n in names])
    print(f"{'macro':28s} {macro_tower:10.3f} {macro_pixels:13.3f}   ratio tower/pixels {macro_tower / macro_pixels:.2f}")


if __name__ == "__main__":
    main()
