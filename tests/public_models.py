"""Tiny stand-ins for public models, written the way users get them: open_clip folders, and repos in a local HF cache
in hub layout (so ``hf-hub:`` ids and HF text-model ids resolve offline under ``HF_HUB_OFFLINE=1``)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

TINY_VIT = {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16, "mlp_ratio": 2.0}
TINY_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
REPORTS = ["FINDINGS: No pneumothorax. IMPRESSION: Mild cardiomegaly.", "Large right pleural effusion.",
           "No acute cardiopulmonary process.", "Left lower lobe consolidation, possibly pneumonia."]


def hub_cache() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def put_in_hub_cache(repo_id: str, folder: Path) -> None:
    """Copy ``folder``'s files into the HF cache as the ``main`` snapshot of model repo ``repo_id``."""
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def tiny_bert(out_dir: Path) -> Path:
    """A 2-layer BERT with a WordPiece vocabulary trained on a few reports (transformers layout)."""
    from transformers import BertConfig, BertModel

    from rvl.model.factory import train_wordpiece

    train_wordpiece(REPORTS * 3, 300, out_dir, 32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(str(out_dir))
    return out_dir


def open_clip_folder(out_dir: Path, text_cfg: dict | None = None, seed: int = 0) -> Path:
    """An open_clip model folder as ``save_for_hf`` writes it (``open_clip_config.json``, weights, tokenizer)."""
    import open_clip
    import safetensors.torch
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = {"embed_dim": 32, "vision_cfg": dict(TINY_VIT), "text_cfg": dict(text_cfg or TINY_TEXT)}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27]}}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out_dir}", pretrained_text=False)
    with torch.no_grad():  # distinctive values: loaded weights can be told apart from fresh ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    safetensors.torch.save_file(model.state_dict(), str(out_dir / "open_clip_model.safetensors"))
    if text_cfg and text_cfg.get("hf_tokenizer_name"):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"]).save_pretrained(str(out_dir))
    return out_dir
