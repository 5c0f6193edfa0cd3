"""Training configuration: dataclasses, YAML files and command-line overrides (hyphen flags win over the file).

Every field of every section gets a flag named after it (``optim.lr`` -> ``--lr``, ``train.save_every`` ->
``--save-every``), plus the short aliases of the ``rvl pretrain`` interface (``--data``, ``--model``). Precedence:
dataclass defaults < ``--config FILE`` < flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    source: str = ""                    # prepared cache dir or manifest (parquet/csv/jsonl)
    train_split: str = "train"
    val_split: str = "validate"
    max_views: int = 2
    num_workers: int = 0
    strict: bool = False                # unreadable image -> error instead of a counted skip
    max_val_studies: int = 2000
    sentence_sampling: float = 0.0      # chance a training text is one report sentence (rvl.text_sampling)


@dataclass
class ModelConfig:
    name: str = "rvl-tiny"              # packaged config, JSON path or open_clip name
    init: str | None = None             # towers' weights: rvl export, local-dir:/hf-hub: open_clip model, tag, file
    pretrained: str | None = None       # older name of init (an exported rvl folder)
    text_tower: str | None = None       # HF model id or folder replacing the text tower (pretrained weights)
    image_tower: str | None = None      # timm:NAME replacing the image tower (timm's pretrained weights)
    lock_image: bool = False            # freeze the image tower (open_clip lock_image_tower)
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False             # freeze the text tower (open_clip lock_text_tower); its projection trains
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    cache_text_features: bool = False   # locked HF text tower: run it once per distinct report, train the projection
    caption_vocab: str = "full"         # full | train (the caption decoder predicts only the training reports' tokens)
    text_pooling: str | None = None     # report | sentences: a text's embedding is the mean of its projected sentences
    fusion: str | None = None           # override rvl_cfg.fusion: attention | mean
    grad_checkpointing: bool = False
    compile: bool = False               # torch.compile the model


@dataclass
class ObjectiveConfig:
    contrastive_weight: float = 1.0
    caption_weight: float = 0.2         # report generation; 0 switches it off
    label_aware_weight: float = 0.3     # soft label-match targets; 0 = plain InfoNCE
    label_head_weight: float = 0.0      # shared label classifier on both towers' embeddings (BCE on known labels)


@dataclass
class OptimConfig:
    lr: float = 5e-4                    # new parts (and every parameter when nothing is pretrained)
    pretrained_lr: float | None = None  # parameters loaded from pretrained weights (None: same as lr)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    max_steps: int = 1000
    batch_size: int = 32                # per process
    grad_accum: int = 1
    grad_clip: float = 1.0
    mixed_precision: str = "auto"       # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16


@dataclass
class TrainConfig:
    output_dir: str = "runs/rvl"
    seed: int = 0
    save_every: int = 200
    keep_last: int = 2
    eval_every: int = 200
    log_every: int = 10
    log_with: str = "tensorboard"       # tensorboard | wandb | all | none
    max_bad_steps: int = 5              # consecutive non-finite losses before stopping
    collapse_ratio: float = 0.1         # collapse: 1 - mean pairwise cosine fell below this share of its start value
    stop_on_collapse: bool = True       # stop (keeping the last checkpoint) instead of only warning
    resume: bool = False
    cpu: bool = False                   # force CPU (also for multi-process gloo runs)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"optim.lr": ...}`` with only scalar values (for ``init_trackers``)."""
        return {f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                for s, d in self.to_dict().items() for k, v in d.items()}


ALIASES = {"data.source": ["--data"], "model.name": ["--model"],
           "model.lock_text_unlocked_layers": ["--unlocked-layers"]}


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _parse_type(annotation: str):
    if "bool" in annotation:
        return lambda s: str(s).lower() in ("1", "true", "yes", "on")
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One hyphen flag per config field (default SUPPRESS, so only flags the user typed override the file)."""
    parser.add_argument("--config", help="YAML/JSON training config; flags given on the command line override it")
    for section, cls in _sections().items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            dest = f"{section}.{f.name}"
            flags = ALIASES.get(dest, []) + [f"--{f.name.replace('_', '-')}"]
            kind = str(f.type)
            if kind == "bool":  # --resume / --no-resume
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
            else:
                group.add_argument(*flags, dest=dest, type=_parse_type(kind), default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=f"default {f.default!r}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file (sections as nested mappings), then ``{"section.field": value}`` overrides."""
    values: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    if path:
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            loaded = json.loads(text)
        else:
            import yaml

            loaded = yaml.safe_load(text) or {}
        for section, entries in loaded.items():
            if section not in values or not isinstance(entries, dict):
                raise ValueError(f"{path}: unknown config section {section!r} (expected {sorted(values)})")
            values[section].update(entries)
    for key, value in (overrides or {}).items():
        section, name = key.split(".", 1)
        values[section][name] = value
    sections = {}
    for name, cls in _sections().items():
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values[name]) - known
        if unknown:
            raise ValueError(f"unknown {name} option(s) {sorted(unknown)}; known: {sorted(known)}")
        sections[name] = cls(**values[name])
    return Config(**sections)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    return load_config(getattr(args, "config", None), overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
