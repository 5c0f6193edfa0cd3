"""Study encoder: masked fusion, view handling, patch tokens, export/import (rvl and plain open_clip)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from rvl.model import create_model, from_pretrained, report_text_for_model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {fusion: create_model("rvl-tiny", fusion=fusion).eval() for fusion in ("attention", "mean")}


def _views(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fusion", ["attention", "mean"])
def test_missing_views_are_masked_not_zero_filled(models, fusion):
    model = models[fusion]
    real, junk = _views(1), _views(1, seed=1)
    types = torch.tensor([[0, 2]])
    with torch.no_grad():
        padded_zero = model.encode_study(torch.stack([real[0], torch.zeros_like(real[0])])[None],
                                         torch.tensor([[True, False]]), types)
        padded_junk = model.encode_study(torch.stack([real[0], junk[0]])[None], torch.tensor([[True, False]]), types)
        single = model.encode_study(real[None], torch.tensor([[True]]), types[:, :1])
        expected = F.normalize(model.encode_image(real, normalize=False) + model.view_type_embed(types[:, 0]), dim=-1)
        zero_filled_mean = F.normalize((model.encode_image(real, normalize=False) + model.view_type_embed(types[:, 0])
                                        + model.encode_image(torch.zeros_like(real), normalize=False)
                                        + model.view_type_embed(types[:, 1])) / 2, dim=-1)
    assert torch.allclose(padded_zero, padded_junk, atol=1e-6)  # whatever sits in a missing slot is ignored
    assert torch.allclose(padded_zero, single, atol=1e-6)      # same as a study that only has that view
    assert torch.allclose(single, expected, atol=1e-5)          # one view: its own embedding (+ its view type)
    assert not torch.allclose(padded_zero, zero_filled_mean, atol=1e-3)


def test_only_real_views_enter_the_image_tower(models):
    model = models["attention"]
    seen = []
    hook = model.clip.visual.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    with torch.no_grad():
        model.encode_study(_views(6).view(3, 2, 3, 64, 64), mask, torch.zeros(3, 2, dtype=torch.long))
    hook.remove()
    assert seen == [4]


def test_mean_fusion_averages_real_views_and_attention_starts_as_mean(models):
    images = _views(4).view(2, 2, 3, 64, 64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    types = torch.tensor([[0, 2], [1, 2]])
    mean_model, attn_model = models["mean"], models["attention"]
    with torch.no_grad():
        per_view = mean_model.encode_image(images.flatten(0, 1), normalize=False).view(2, 2, -1)
        expected = F.normalize((per_view + mean_model.view_type_embed(types)).mean(1), dim=-1)
        assert torch.allclose(mean_model.encode_study(images, mask, types), expected, atol=1e-5)
        # untrained attention pool = masked mean (zero-initialised output projection)
        per_view = attn_model.encode_image(images.flatten(0, 1), normalize=False).view(2, 2, -1)
        expected = F.normalize((per_view + attn_model.view_type_embed(types)).mean(1), dim=-1)
        assert torch.allclose(attn_model.encode_study(images, mask, types), expected, atol=1e-5)
    with pytest.raises(ValueError, match="at least one real view"):
        attn_model.encode_study(images, torch.tensor([[True, True], [False, False]]), types)


def test_view_type_changes_the_study_embedding(models):
    model = models["attention"]
    images = _views(2).view(1, 2, 3, 64, 64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        a = model.encode_study(images, mask, torch.tensor([[0, 2]]))
        b = model.encode_study(images, mask, torch.tensor([[1, 2]]))
    assert not torch.allclose(a, b)


def test_encode_patches_and_text(models):
    model = models["attention"]
    with torch.no_grad():
        patches = model.encode_patches(_views(2))
        reports = model.encode_reports(["FINDINGS: Small left pleural effusion.", "No acute process."] * 3,
                                       batch_size=4)
    grid = model.image_size // 16
    assert patches.shape == (2, grid, grid, model.embed_dim)
    assert torch.allclose(patches.norm(dim=-1), torch.ones(2, grid, grid), atol=1e-5)
    assert reports.shape == (6, model.embed_dim) and torch.allclose(reports[0], reports[2])
    assert model.preprocess.transforms  # open_clip eval transform
    tokens = model.tokenizer(["cardiomegaly"])
    assert tokens.shape == (1, model.model_cfg["text_cfg"]["context_length"]) and tokens.dtype == torch.long


def test_report_text_uses_findings_and_impression():
    pytest.importorskip("rvl.nlp")
    report = ("INDICATION: Cough.\nTECHNIQUE: PA and lateral.\nFINDINGS: Small left effusion.\n"
              "IMPRESSION: Left pleural effusion.")
    text = report_text_for_model(report)
    assert "effusion" in text.lower() and "cough" not in text.lower()
    assert report_text_for_model("Heart size normal.") == "Heart size normal."


def test_save_pretrained_roundtrip_and_open_clip_local_dir(models, tmp_path):
    import open_clip

    model = models["attention"]
    out = model.save_pretrained(tmp_path / "export")
    top = sorted(p.name for p in out.iterdir())
    assert [n for n in top if n.endswith((".safetensors", ".bin", ".pth"))] == ["open_clip_model.safetensors"]
    assert {"open_clip_config.json", "config.json", "tokenizer.json", "rvl_config.json", "rvl"} <= set(top)
    assert json.loads((out / "rvl_config.json").read_text())["rvl_cfg"]["fusion"] == "attention"

    images, mask = _views(4).view(2, 2, 3, 64, 64), torch.tensor([[True, True], [True, False]])
    types = torch.tensor([[0, 2], [1, 4]])
    text = ["FINDINGS: Moderate cardiomegaly.", "IMPRESSION: No pneumothorax."]
    loaded = from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(loaded.encode_study(images, mask, types), model.encode_study(images, mask, types))
        assert torch.allclose(loaded.encode_reports(text), model.encode_reports(text))

    clip, _ = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.no_grad():
        assert torch.allclose(clip.eval().encode_image(images[:, 0], normalize=True), model.encode_image(images[:, 0]),
                              atol=1e-6)
        assert torch.allclose(clip.encode_text(tokenizer(text), normalize=True),
                              model.encode_text(model.tokenizer(text)), atol=1e-6)

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out)  # the folder carries its own text-tower config: rvl loads it from anywhere
    with torch.no_grad():
        assert torch.allclose(from_pretrained(moved).eval().encode_reports(text), model.encode_reports(text))


def test_packaged_configs():
    from rvl.model.factory import get_model_config, list_models

    assert {"rvl-tiny", "rvl-small", "rvl-base"} <= set(list_models())
    base = get_model_config("rvl-base")
    assert base["vision_cfg"]["width"] == 768 and base["rvl_cfg"]["text_tower"]["hidden_size"] == 768
    assert base["text_cfg"]["context_length"] == 128
    small = create_model("rvl-small", tokenizer_texts=["no acute process", "small left effusion"])
    assert small.image_size == 128 and small.embed_dim == 128
    with pytest.raises(ValueError, match="unknown model"):
        get_model_config("no-such-model")


def test_text_tower_initialised_from_local_hf_dir(tmp_path):
    """A pretrained HF text tower from a local folder (offline): its weights are loaded, not re-initialised."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rvl.model.factory import train_wordpiece

    train_wordpiece(["no pleural effusion", "mild cardiomegaly"], 200, tmp_path, 32)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32, pad_token_id=hf_tok.pad_token_id))
    bert.save_pretrained(tmp_path)
    model = create_model("rvl-tiny", text_cfg={"hf_model_name": str(tmp_path), "hf_tokenizer_name": str(tmp_path),
                                               "context_length": 32}, rvl_cfg={"text_tower": None})
    loaded = model.clip.text.transformer.embeddings.word_embeddings.weight
    assert torch.equal(loaded, bert.embeddings.word_embeddings.weight)
    assert model.tokenizer(["mild cardiomegaly"]).shape == (1, 32)


def test_timm_cnn_tower_patches_average_to_the_view_embedding_and_export_loads_in_open_clip(tmp_path):
    """rvl-demo's timm ResNet tower: per-cell embeddings (the grounding heatmap) are exact parts of the pooled one."""
    import open_clip

    torch.manual_seed(0)
    model = create_model("rvl-demo", tokenizer_texts=["no acute process", "small left effusion"]).eval()
    images = torch.randn(3, 3, model.image_size, model.image_size)
    with torch.no_grad():
        cells = model.encode_patches(images, normalize=False)
        pooled = model.encode_image(images, normalize=False)
        grid = model.image_size // 32  # ResNet stride
        assert cells.shape == (3, grid, grid, model.embed_dim)
        assert torch.allclose(cells.mean(dim=(1, 2)), pooled, atol=1e-5)
        study = model.encode_study(images[:2].unsqueeze(1).repeat(1, 2, 1, 1, 1), torch.tensor([[1, 1], [1, 0]]),
                                   torch.tensor([[0, 2], [1, 4]]))
        assert torch.allclose(study.norm(dim=-1), torch.ones(2), atol=1e-5)
    out = model.save_pretrained(tmp_path / "export")
    clip, _ = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    with torch.no_grad():
        assert torch.allclose(clip.eval().encode_image(images, normalize=True), model.encode_image(images), atol=1e-5)
