"""``rvl finetune``: REFERS's label-efficient transfer protocol (1 / 10 / 100 % labels, seeds, CIs) on any manifest."""
from __future__ import annotations

import argparse
import sys

from rvl.constants import CHEXPERT_LABELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared cache or manifest with train and test splits")
    parser.add_argument("--init", nargs="+", required=True, help="encoder start(s): an exported rvl model folder "
                        "(rvl pretrain's OUT/model), 'scratch' (random weights of --model) and/or any public-weights "
                        "source of rvl pretrain --init (local-dir:DIR, hf-hub:ORG/NAME, a tag or file of --model)")
    parser.add_argument("--mode", nargs="+", default=["linear", "full"], choices=["linear", "full"],
                        help="linear: a head on frozen cached study embeddings; full: fine-tune the image tower + "
                        "fusion with a fresh head (default both)")
    parser.add_argument("--label-fraction", nargs="+", type=float, default=[0.01, 0.1, 1.0],
                        help="shares of the training patients with labels (default 0.01 0.1 1.0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="labels to train and score (default: the 14 CheXpert labels); quote names with spaces")
    parser.add_argument("--output-dir", required=True, help="output folder FT (summary.csv/md, predictions/, ...)")
    parser.add_argument("--model", default="rvl-demo", help="model config of --init scratch and of a pretrained tag or "
                        "checkpoint file (default rvl-demo)")
    parser.add_argument("--views", choices=["study", "frontal"], default="study",
                        help="study: every view, fused; frontal: one view, frontal first")
    parser.add_argument("--loss", choices=["bce", "asl", "focal"], default="bce")
    parser.add_argument("--pos-weight", choices=["none", "auto"], default="none",
                        help="auto: BCE positive weight per label = negatives / positives of the training subset")
    parser.add_argument("--uncertain", choices=["ignore", "zeros", "ones"], default="ignore",
                        help="-1 labels: left out of the loss (U-Ignore), negative (U-Zeros) or positive (U-Ones)")
    parser.add_argument("--blank", choices=["negative", "ignore"], default="negative",
                        help="labels the report does not mention: negative (default) or left out of the loss")
    parser.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta alpha for full fine-tuning (0 = off)")
    parser.add_argument("--cut-remain", type=float, default=0.0,
                        help="Cut&Remain: share of boxed training images reduced to their finding boxes (0 = off)")
    parser.add_argument("--max-steps", type=int, default=200, help="full fine-tuning steps (fixed; default 200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="full fine-tuning peak learning rate")
    parser.add_argument("--head-lr-scale", type=float, default=10.0,
                        help="full mode: the fresh head's learning rate is --lr times this (default 10)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--layer-decay", type=float, default=0.0,
                        help="layer-wise lr decay of a timm image tower, e.g. 0.75 (0 = off)")
    parser.add_argument("--linear-steps", type=int, default=300, help="linear-probe optimisation steps")
    parser.add_argument("--linear-lr", type=float, default=1e-2)
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N full fine-tuning steps")
    parser.add_argument("--resume", action="store_true",
                        help="finish the grid in --output-dir: finished runs are skipped, an interrupted one resumes")
    parser.add_argument("--cam", type=int, default=0, metavar="K",
                        help="write CAM overlays for K test studies per run and score the CAM pointing game")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the AUC CIs")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                        help="auto: bf16 on GPU, none on CPU")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")


def settings_from_args(args: argparse.Namespace):
    from rvl.finetune.losses import label_indices
    from rvl.finetune.trainer import FinetuneSettings

    labels = list(args.labels or CHEXPERT_LABELS)
    label_indices(labels, CHEXPERT_LABELS)  # a clear error for a misspelt label
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels has duplicates: {labels}")
    for name in ("max_steps", "batch_size", "linear_steps", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cutmix < 0:
        raise ValueError(f"--cutmix must be >= 0, got {args.cutmix}")
    if not 0.0 <= args.cut_remain <= 1.0:
        raise ValueError(f"--cut-remain must be in [0, 1], got {args.cut_remain}")
    if args.cam < 0:
        raise ValueError(f"--cam must be >= 0, got {args.cam}")
    return FinetuneSettings(
        labels=labels, model=args.model, views=args.views, loss=args.loss, pos_weight=args.pos_weight,
        uncertain=args.uncertain, blank=args.blank, cutmix=args.cutmix, cut_remain=args.cut_remain,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, head_lr_scale=args.head_lr_scale,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, layer_decay=args.layer_decay, linear_steps=args.linear_steps,
        linear_lr=args.linear_lr, save_every=args.save_every, mixed_precision=args.mixed_precision, cpu=args.cpu)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rvl.data.schema import ManifestError
    from rvl.fileio import OutputBusyError
    from rvl.finetune.grid import run_grid

    try:
        settings = settings_from_args(args)
        if not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data}: no such file or folder")
        summary = run_grid(args.data, args.output_dir, args.init, args.mode, args.label_fraction, args.seeds,
                           settings, resume=args.resume, cam=args.cam, n_bootstrap=args.bootstrap,
                           train_split=args.train_split, test_split=args.test_split)
    except (ValueError, FileNotFoundError, ManifestError, KeyError, OutputBusyError) as err:
        print(f"rvl finetune: error: {err}", file=sys.stderr)
        return 2
    print(summary.get("table", "no finished run"))
    print(f"{summary['trained']} run(s) trained, {summary['skipped_finished']} already finished; "
          f"wrote {Path(args.output_dir) / 'summary.md'}")
    return 0
