"""Export an rvl model as a folder that plain open_clip loads (``local-dir:``), plus the rvl sidecar.

Only the writing side lives here; :func:`rvl.model.factory.from_pretrained` reads the folder back. This module does
not import the model class, so the model can call it without an import circle.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

from rvl.fileio import raise_if_disk_full, replace_dir
from rvl.integrity import write_checksums

__all__ = ["save_pretrained", "OPEN_CLIP_CONFIG_NAME", "OPEN_CLIP_WEIGHTS_NAME", "RVL_CONFIG_NAME",
           "RVL_WEIGHTS_SUBDIR", "RVL_WEIGHTS_NAME"]

RVL_CONFIG_NAME = "rvl_config.json"
RVL_WEIGHTS_SUBDIR = "rvl"  # extra weights live here so open_clip's _find_checkpoint_in_dir never picks them
RVL_WEIGHTS_NAME = "rvl_heads.safetensors"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"


def save_pretrained(model, save_dir: str | Path) -> Path:
    """Write an open_clip-loadable folder plus the rvl sidecar, atomically (tmp dir in the same parent, then rename).

    Layout: ``open_clip_config.json``, ``open_clip_model.safetensors``, tokenizer files, the HF text tower's
    ``config.json`` (so the folder loads without the original text-tower path), ``rvl_config.json`` and
    ``rvl/rvl_heads.safetensors`` (fusion, view-type embedding, caption decoder), and ``checksums.json`` (sha256 of
    every other file).
    """
    save_dir = Path(save_dir).resolve()
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        _write_folder(model, tmp, save_dir)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous export stays as it was
        raise_if_disk_full(save_dir.parent, err, f"the model export {save_dir}")
        raise
    replace_dir(tmp, save_dir)
    for stale in save_dir.parent.glob(f".{save_dir.name}.tmp-*"):  # half-written exports of killed runs
        shutil.rmtree(stale, ignore_errors=True)
    return save_dir


def _write_folder(model, tmp: Path, save_dir: Path) -> None:
    """Every file of the export into ``tmp`` (``save_dir``: the final place, named inside the HF config)."""
    import safetensors.torch
    from open_clip.push_to_hf_hub import save_for_hf

    model_cfg = copy.deepcopy(model.model_cfg)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        model.clip.text.config.save_pretrained(tmp)
        # the final location, not tmp: open_clip reads hf_model_name with AutoConfig when it loads the folder
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(save_dir)
    tokenizer = model.tokenizer
    if not hasattr(tokenizer, "save_pretrained"):  # open_clip's SimpleTokenizer: its BPE vocab ships with open_clip
        tokenizer = type("_NoSave", (), {"save_pretrained": staticmethod(lambda dest: None)})()
    save_for_hf(model.clip, tokenizer, model_cfg, tmp, safe_serialization=True)
    (tmp / RVL_CONFIG_NAME).write_text(json.dumps({"rvl_cfg": model.rvl_cfg, "format_version": 1}, indent=2))
    (tmp / RVL_WEIGHTS_SUBDIR).mkdir()
    heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    safetensors.torch.save_file(heads, str(tmp / RVL_WEIGHTS_SUBDIR / RVL_WEIGHTS_NAME))
    write_checksums(tmp)  # checksums.json: from_pretrained and `rvl verify` check every file against it
