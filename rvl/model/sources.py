"""Where a model's weights come from: rvl exports, public open_clip models, timm image towers and HF text towers.

Users start from public models, not random weights. :func:`build_from_init` makes an :class:`RVLModel` whose towers
come from one of these sources while rvl's own parts (view-type embeddings, fusion, caption decoder, label head)
start fresh:

===============================  =================================================================================
``--init``                       towers from
===============================  =================================================================================
an rvl export folder             the whole model (``rvl pretrain`` output, ``save_pretrained``)
``local-dir:DIR`` / ``DIR``      an open_clip folder (``open_clip_config.json`` + weights), e.g. a saved BiomedCLIP
``hf-hub:ORG/NAME``              an open_clip model on the Hugging Face hub (BiomedCLIP, ...), from the local HF cache
                                 when ``HF_HUB_OFFLINE=1``
``TAG`` with ``--model NAME``    an open_clip pretrained tag (``--model ViT-B-16 --init openai``)
``FILE`` with ``--model NAME``   an open_clip checkpoint file (state dict) for the model ``NAME``
===============================  =================================================================================

``text_tower`` (any HF model id or local folder, e.g. CXR-BERT or all-MiniLM) replaces the text tower with that
pretrained transformer; ``image_tower="timm:NAME"`` replaces the image tower with timm's ImageNet weights. A
checkpoint that does not fit the towers it is loaded into is an error naming the keys. The same loader serves the
inference commands (``rvl zeroshot/heatmap/index/search/evaluate --model``): an unmodified open_clip model is wrapped
with a masked-mean fusion and zero view-type embeddings, so a single image gets exactly open_clip's embedding.
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rvl.model.core import RVLModel
from rvl.model.factory import DEFAULT_RVL_CFG, _deep_update, _open_clip_preprocess_cfg, build_towers, create_model, \
    from_pretrained, get_model_config, resolve_text_model

__all__ = ["TowerMismatchError", "LoadReport", "build_from_init", "load_model_source", "is_rvl_export",
           "lock_towers", "hf_text_cfg", "timm_vision_cfg"]

_LOGGER = logging.getLogger(__name__)
OPEN_CLIP_CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
TEXT_KEYS = ("text.", "token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
             "attn_mask")  # a CLIP state dict's text-tower keys (built-in or HF text tower)


class TowerMismatchError(RuntimeError):
    """Pretrained weights do not fit the towers they are loaded into (the message names the keys)."""


@dataclass
class LoadReport:
    """What was loaded from where and what starts fresh; ``pretrained`` holds the loaded parameter names."""

    rows: list[tuple[str, str, int]] = field(default_factory=list)  # (part, source or "new", parameters)
    pretrained: set[str] = field(default_factory=set)

    def recount(self, model) -> "LoadReport":
        """Parameter counts of ``model`` as it is now (e.g. after the caption vocabulary was made compact)."""
        counts = dict(_part_counts(model))
        self.rows = [(part, source, counts.get(part, count)) for part, source, count in self.rows]
        return self

    def table(self) -> str:
        width = max([len(r[1]) for r in self.rows] + [6])
        lines = [f"{'part':<22} {'source':<{width}} {'parameters':>12}"]
        lines += [f"{part:<22} {source:<{width}} {count:>12,}" for part, source, count in self.rows]
        loaded = sum(c for _, s, c in self.rows if s != "new")
        lines.append(f"{'total':<22} {'loaded ' + format(loaded, ','):<{width}} {sum(r[2] for r in self.rows):>12,}")
        return "\n".join(lines)


def is_rvl_export(path: str | Path) -> bool:
    path = Path(str(path).removeprefix("local-dir:"))
    return path.is_dir() and (path / "rvl_config.json").is_file()


def hf_text_cfg(name_or_dir: str, base: dict | None = None) -> dict:
    """open_clip ``text_cfg`` for a pretrained HF transformer (mean pooling, linear projection unless ``base`` says)."""
    name_or_dir = resolve_text_model(name_or_dir)
    base = dict(base or {})
    keep = {k: base[k] for k in ("context_length", "hf_proj_type", "hf_pooler_type", "proj_bias") if k in base}
    return {"hf_model_name": str(name_or_dir), "hf_tokenizer_name": str(name_or_dir), "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear", "context_length": 96, **keep}


def timm_vision_cfg(spec: str, base: dict | None = None) -> dict:
    """open_clip ``vision_cfg`` for ``timm:NAME`` with timm's pretrained weights (average pooling, linear head)."""
    name = spec.removeprefix("timm:")
    base = dict(base or {})
    return {"timm_model_name": name, "timm_model_pretrained": True, "timm_pool": "avg", "timm_proj": "linear",
            "image_size": base.get("image_size", 224)}


def _resolve_source(init: str, model_name: str | None) -> tuple[dict, dict, str | None, str]:
    """(open_clip model_cfg, preprocess_cfg, checkpoint path or None, description) of an ``--init`` source."""
    import open_clip
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf, get_pretrained_cfg

    local = init.removeprefix("local-dir:")
    if init.startswith("hf-hub:"):
        hub_id = init.removeprefix("hf-hub:")
        try:
            config = json.loads(Path(download_pretrained_from_hf(hub_id, filename="open_clip_config.json")).read_text())
            checkpoint = download_pretrained_from_hf(hub_id)
        except Exception as err:  # offline without a cached copy, unknown repo, ...
            raise FileNotFoundError(f"--init {init}: cannot get the open_clip model from the hub or the local HF "
                                    f"cache ({type(err).__name__}: {str(err).splitlines()[0]})") from None
        return config["model_cfg"], config.get("preprocess_cfg", {}), checkpoint, init
    if Path(local).is_dir():
        folder = Path(local)
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"--init {init}: folder has no open_clip_config.json (not an open_clip or rvl "
                                    "model folder)")
        config = json.loads((folder / "open_clip_config.json").read_text())
        found = [folder / n for n in OPEN_CLIP_CHECKPOINTS if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"--init {init}: no weights ({', '.join(OPEN_CLIP_CHECKPOINTS)}) in {folder}")
        return config["model_cfg"], config.get("preprocess_cfg", {}), str(found[0]), f"local-dir:{folder}"
    if not model_name:
        raise ValueError(f"--init {init!r} is not a folder or hf-hub: id; a pretrained tag or checkpoint file also "
                         "needs --model NAME (e.g. --model ViT-B-16 --init openai)")
    cfg = get_model_config(model_name)
    model_cfg = {k: v for k, v in cfg.items() if k != "rvl_cfg"}
    preprocess = _open_clip_preprocess_cfg(cfg)
    if Path(init).is_file():
        return model_cfg, preprocess, str(init), f"{Path(init).name}"
    tag_cfg = get_pretrained_cfg(model_name, init)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"--init {init!r}: not a folder, file, hf-hub: id or a pretrained tag of {model_name} "
                         f"(tags: {', '.join(tags) or 'none'})")
    try:
        checkpoint = download_pretrained(tag_cfg)
    except Exception as err:
        raise FileNotFoundError(f"--init {init}: cannot get the weights of {model_name}/{init} "
                                f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    preprocess = {**preprocess, **{k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                   if k in tag_cfg}}
    return model_cfg, preprocess, checkpoint, f"{model_name}/{init}"


def _load_tower_weights(clip, checkpoint: str, skip_text: bool, skip_image: bool, where: str) -> None:
    """Load a CLIP checkpoint into ``clip``; keys of a replaced tower are skipped, any other mismatch is an error."""
    from open_clip.convert import convert_state_dict
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    def ours(key: str) -> bool:
        if skip_image and key.startswith("visual."):
            return False
        return not (skip_text and key.startswith(TEXT_KEYS))

    state = convert_state_dict(clip, load_state_dict(checkpoint))  # the same massaging as open_clip.load_checkpoint
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    resize_pos_embed(state, clip)
    resize_text_pos_embed(state, clip)
    state = {k: v for k, v in state.items() if ours(k) and not k.endswith("position_ids")}
    if "logit_scale" in state and state["logit_scale"].ndim != clip.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    current = clip.state_dict()
    expected = {k for k in current if ours(k) and not k.endswith("position_ids")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    wrong_shape = sorted(k for k in set(state) & expected if tuple(state[k].shape) != tuple(current[k].shape))
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        raise TowerMismatchError(f"{where}: the checkpoint does not fit the towers: missing {show(missing) or 'none'}; "
                                 f"unexpected {show(unexpected) or 'none'}; wrong shape {show(wrong_shape) or 'none'}")
    clip.load_state_dict(state, strict=False)


def build_from_init(model_name: str | None = None, init: str | None = None, *, text_tower: str | None = None,
                    image_tower: str | None = None, rvl_overrides: dict | None = None,
                    text_dir: str | Path | None = None, for_inference: bool = False) -> tuple[RVLModel, LoadReport]:
    """An :class:`RVLModel` whose towers start from public weights (see the module docstring for the sources).

    Args:
        model_name: packaged rvl config, JSON file or open_clip name (the architecture when ``init`` is a tag/file).
        init: where the towers' weights come from (None: the architecture of ``model_name`` as configured).
        text_tower: HF model id or folder replacing the text tower (pretrained weights).
        image_tower: ``timm:NAME`` replacing the image tower (timm's pretrained weights).
        rvl_overrides: ``rvl_cfg`` keys (fusion, label_head, ...).
        text_dir: trained WordPiece tokenizer for a locally built text tower (``rvl pretrain`` writes one).
        for_inference: wrap for use without training: masked-mean fusion, zero view-type embeddings.
    """
    rvl_overrides = dict(rvl_overrides or {})
    if for_inference:
        rvl_overrides.setdefault("fusion", "mean")
    if init and is_rvl_export(init):
        if text_tower or image_tower:
            raise ValueError("--text-tower / --image-tower replace a tower of a public model; an rvl export already "
                             "has both (start from it alone)")
        model = from_pretrained(init)
        report = LoadReport(pretrained={n for n, _ in model.named_parameters()})
        report.rows = [(part, str(init), n) for part, n in _part_counts(model)]
        return model, report
    if not init:
        overrides: dict[str, Any] = dict(rvl_overrides)
        base = get_model_config(model_name or "rvl-tiny")
        if text_tower:
            overrides["text_cfg"] = hf_text_cfg(text_tower, base["text_cfg"])
            overrides["rvl_cfg"] = {"text_tower": None}
        if image_tower:
            overrides["vision_cfg"] = timm_vision_cfg(image_tower, base["vision_cfg"])
        model = create_model(model_name or "rvl-tiny", text_dir=text_dir, **overrides)
        sources = {"text tower": text_tower and resolve_text_model(text_tower), "image tower": image_tower}
    else:
        model_cfg, preprocess_cfg, checkpoint, described = _resolve_source(init, model_name)
        model_cfg = copy.deepcopy(model_cfg)
        rvl_cfg = copy.deepcopy(DEFAULT_RVL_CFG)
        if model_name and not init.startswith(("hf-hub:", "local-dir:")) and not Path(init).is_dir():
            rvl_cfg = get_model_config(model_name)["rvl_cfg"]  # an rvl config's own heads, e.g. rvl-demo's decoder
        rvl_cfg = _deep_update(rvl_cfg, {"text_tower": None, "view_embed_std": 0.0, **rvl_overrides})
        if text_tower:
            model_cfg["text_cfg"] = hf_text_cfg(text_tower, model_cfg.get("text_cfg"))
        if image_tower:
            model_cfg["vision_cfg"] = timm_vision_cfg(image_tower, model_cfg.get("vision_cfg"))
        with tempfile.TemporaryDirectory(prefix="rvl-init-") as tmp:
            clip, tokenizer = build_towers(model_cfg, preprocess_cfg, bool(text_tower), Path(tmp))
        _load_tower_weights(clip, checkpoint, skip_text=bool(text_tower), skip_image=bool(image_tower),
                            where=f"--init {init}")
        model = RVLModel(clip, tokenizer, model_cfg, rvl_cfg)
        sources = {"text tower": text_tower or described, "image tower": image_tower or described,
                   "logit scale": described, "text projection": None if text_tower else described,
                   "image projection": None if image_tower else described}
    if for_inference:
        import torch

        with torch.no_grad():
            model.view_type_embed.weight.zero_()
    vision_cfg = model.model_cfg.get("vision_cfg", {})
    if vision_cfg.get("timm_model_pretrained"):  # weights now live in the model; a reload must not download them
        model.model_cfg["vision_cfg"] = {**vision_cfg, "timm_model_pretrained": False}
    report = LoadReport()
    for part, count in _part_counts(model):
        source = sources.get(part) or "new"
        report.rows.append((part, source, count))
        if source != "new":
            report.pretrained |= {f"{prefix}{n}" for prefix, module in _part_modules(model)[part]
                                  for n, _ in module.named_parameters()}
    return model, report


def _part_modules(model: RVLModel) -> dict[str, list[tuple[str, Any]]]:
    """The model's parts as (parameter-name prefix, module) lists. A timm trunk / HF transformer and its new
    projection head are separate parts: the head starts fresh even when the tower is pretrained."""
    clip = model.clip
    parts: dict[str, list[tuple[str, Any]]] = {}
    if hasattr(clip.visual, "trunk"):
        parts["image tower"] = [("clip.visual.trunk.", clip.visual.trunk)]
        parts["image projection"] = [("clip.visual.head.", clip.visual.head)]
    else:
        parts["image tower"] = [("clip.visual.", clip.visual)]
    if hasattr(clip, "text") and hasattr(clip.text, "transformer") and hasattr(clip.text, "proj"):
        parts["text tower"] = [("clip.text.", _Params({n: p for n, p in clip.text.named_parameters()
                                                        if not n.startswith("proj.")}))]
        parts["text projection"] = [("clip.text.proj.", clip.text.proj)]
    else:  # open_clip's built-in text transformer: every child but the image tower, plus loose parameters
        parts["text tower"] = [(f"clip.{n}.", m) for n, m in clip.named_children() if n != "visual"]
        parts["text tower"].append(("clip.", _Params({n: p for n, p in clip.named_parameters(recurse=False)
                                                      if n not in ("logit_scale", "logit_bias")})))
    parts["logit scale"] = [("clip.", _Params({"logit_scale": clip.logit_scale}))]
    parts["view-type embeddings"] = [("view_type_embed.", model.view_type_embed)]
    if model.fusion is not None:
        parts["fusion"] = [("fusion.", model.fusion)]
    parts["caption decoder"] = [("caption_decoder.", model.caption_decoder)]
    if model.label_head is not None:
        parts["label head"] = [("label_head.", model.label_head)]
    return parts


class _Params:
    """Adapter: a dict of parameters that answers ``named_parameters`` like a module."""

    def __init__(self, params: dict):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


def _part_counts(model: RVLModel) -> list[tuple[str, int]]:
    return [(part, sum(p.numel() for _, module in modules for _, p in module.named_parameters()))
            for part, modules in _part_modules(model).items()]


def lock_towers(model: RVLModel, lock_image: bool = False, image_unlocked_groups: int = 0,
                freeze_bn_stats: bool = False, lock_text: bool = False, text_unlocked_layers: int = 0,
                freeze_layer_norm: bool = True) -> None:
    """Freeze pretrained towers as open_clip does (``lock_image_tower`` / ``lock_text_tower``)."""
    if lock_image:
        model.clip.lock_image_tower(unlocked_groups=image_unlocked_groups, freeze_bn_stats=freeze_bn_stats)
    if not lock_text:
        return
    text = getattr(model.clip, "text", None)
    if text_unlocked_layers and hasattr(text, "transformer") and hasattr(getattr(text.transformer, "encoder", None),
                                                                         "layer"):
        # open_clip 3.3's HFTextEncoder.lock looks up a "layer_attr" that its arch table lacks for BERT/RoBERTa
        # (KeyError), so the partial lock of a BERT-style encoder is done here with the same rule: embeddings and all
        # but the last N layers frozen, LayerNorms too unless freeze_layer_norm is False
        blocks = [text.transformer.embeddings, *text.transformer.encoder.layer][:-text_unlocked_layers]
        for block in blocks:
            for name, param in block.named_parameters():
                param.requires_grad = (not freeze_layer_norm) if "LayerNorm" in name.split(".") else False
        return
    model.clip.lock_text_tower(unlocked_layers=text_unlocked_layers, freeze_layer_norm=freeze_layer_norm)


def load_model_source(spec: str, device: str | None = None) -> RVLModel:
    """A model for the inference commands from ``spec``: an rvl export, ``local-dir:DIR`` / open_clip folder,
    ``hf-hub:ORG/NAME``, or ``NAME:TAG`` (an open_clip name and pretrained tag), in eval mode on ``device``."""
    import torch

    spec = str(spec)
    if is_rvl_export(spec):
        model = from_pretrained(spec)
    elif spec.startswith(("hf-hub:", "local-dir:")) or Path(spec).is_dir():
        model, _ = build_from_init(init=spec, for_inference=True)
    elif ":" in spec:
        name, tag = spec.split(":", 1)
        model, _ = build_from_init(name, tag, for_inference=True)
    else:
        raise FileNotFoundError(f"model {spec!r}: not an rvl or open_clip model folder, hf-hub: id or NAME:TAG")
    return model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
