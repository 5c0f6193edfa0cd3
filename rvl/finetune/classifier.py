"""The fine-tuned classifier (study encoder + one linear head) and where its encoder comes from (``--init``)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["StudyClassifier", "resolve_init", "init_key"]


def resolve_init(source: str, model_name: str = "rvl-demo", seed: int = 0):
    """Build the encoder a fine-tuning run starts from. Every ``--init`` value goes through here.

    Args:
        source: ``scratch`` (random weights of ``model_name``, seeded by ``seed``), an exported rvl model folder
            (``rvl pretrain``'s ``OUT/model``) or any public-weights source of ``rvl pretrain --init``
            (``local-dir:DIR`` / ``hf-hub:ORG/NAME`` open_clip models, or a pretrained tag / checkpoint file of
            ``model_name``; see :mod:`rvl.model.sources`), whose rvl parts start fresh.
        model_name: Model config for ``scratch`` and for a tag or checkpoint file.
        seed: Seed of every random initialisation (the whole ``scratch`` model, the new parts of a public one).

    Raises:
        ValueError: ``source`` is none of these (the message says what is accepted).
    """
    from rvl.model import create_model
    from rvl.model.sources import build_from_init

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if source == "scratch":
            return create_model(model_name)
        try:
            model, _ = build_from_init(model_name, str(source))
        except FileNotFoundError as err:
            raise ValueError(f"--init {source!r}: not 'scratch', an exported rvl model folder (e.g. the OUT/model "
                             f"written by `rvl pretrain`) or a public-weights source ({err})") from None
    return model


def init_key(source: str) -> str:
    """File-name-safe name of an ``--init`` value: ``scratch``, or the folder's last two parts plus a short hash of
    its resolved path (two folders both named ``model`` stay apart)."""
    if source == "scratch":
        return "scratch"
    path = Path(str(source).removeprefix("local-dir:"))
    if not path.exists():  # a hub id or pretrained tag: its own name, whatever the working folder
        readable = re.sub(r"[^A-Za-z0-9._-]+", "-", str(source)).strip("-")
        return f"{readable}-{hashlib.sha1(str(source).encode()).hexdigest()[:6]}"
    path = path.resolve()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(path.parts[-2:])).strip("-")
    return f"{readable}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


class StudyClassifier(nn.Module):
    """Logits ``(B, L)`` of a study: ``head(encoder.encode_study(..., normalize=False))``, the head seeded by ``seed``.

    Only the image side takes part: the text tower, caption decoder and temperature are frozen (never used, and an
    unused trainable parameter would stall DDP's gradient reduction).
    """

    def __init__(self, encoder: Any, num_labels: int, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        with torch.random.fork_rng(devices=[]):  # the fresh head is a function of the seed: identical reruns
            torch.manual_seed(int(seed))
            self.head = nn.Linear(int(encoder.embed_dim), num_labels)
        for name, param in encoder.named_parameters():
            param.requires_grad_(self.is_image_side(name))

    @staticmethod
    def is_image_side(name: str) -> bool:
        """Whether an encoder parameter belongs to the image tower, the view-type embedding or the fusion."""
        return name.startswith(("clip.visual.", "view_type_embed.", "fusion."))

    def features(self, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor) -> torch.Tensor:
        """Unnormalised study embeddings ``(B, D)`` (what the head reads)."""
        return self.encoder.encode_study(images, view_mask, view_types, normalize=False)

    def forward(self, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images, view_mask, view_types))

    def freeze_encoder(self) -> None:
        """Linear probe: only the head trains."""
        self.encoder.requires_grad_(False)

    def image_parameter_groups(self, lr: float, weight_decay: float, layer_decay: float | None,
                               head_lr_scale: float = 1.0) -> list[dict]:
        """Optimizer groups: head at ``lr * head_lr_scale``; fusion + view embedding at ``lr * layer_decay``; the
        image tower's layers from timm's layer-wise decay (``timm.optim.param_groups_layer_decay``, its deepest block
        one step below the fusion). Without ``layer_decay`` the encoder gets ``lr``. No weight decay on 1-d
        parameters."""
        def split(named, scale: float) -> list[dict]:
            decay = [p for n, p in named if p.requires_grad and p.ndim >= 2]
            flat = [p for n, p in named if p.requires_grad and p.ndim < 2]
            return [g for g in ({"params": decay, "weight_decay": weight_decay, "lr": lr * scale},
                                {"params": flat, "weight_decay": 0.0, "lr": lr * scale}) if g["params"]]

        encoder = self.encoder
        top = [(n, p) for n, p in encoder.named_parameters() if n.startswith(("view_type_embed.", "fusion."))]
        visual = [(n, p) for n, p in encoder.clip.visual.named_parameters()]
        groups = split(list(self.head.named_parameters()), head_lr_scale)
        if not layer_decay:
            return groups + split(top, 1.0) + split(visual, 1.0)
        trunk = getattr(encoder.clip.visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "group_matcher"):
            raise ValueError("--layer-decay needs a timm image tower (vision_cfg.timm_model_name); this model's "
                             "tower has no layer grouping")
        from timm.optim import param_groups_layer_decay

        groups += split(top, layer_decay)
        trunk_ids = {id(p) for p in trunk.parameters()}
        for group in param_groups_layer_decay(trunk, weight_decay=weight_decay, layer_decay=layer_decay):
            group = dict(group)
            group["lr"] = lr * layer_decay * group.pop("lr_scale", 1.0)
            group["params"] = [p for p in group["params"] if p.requires_grad]
            if group["params"]:
                groups.append(group)
        rest = [(n, p) for n, p in visual if id(p) not in trunk_ids]  # the tower's projection head
        return groups + split(rest, layer_decay)
