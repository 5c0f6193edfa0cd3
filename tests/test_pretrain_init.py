"""``rvl pretrain`` from public weights: --init, tower locking, separate learning rates, collapse detection."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from public_models import open_clip_folder
from rvl.cli import main as rvl_main


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from rvl.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, 40, size=64, seed=0, fmt="png", progress=False)
    return out / "manifest.parquet"


def test_pretrain_from_open_clip_folder_with_locked_text_and_own_lr(phantoms, tmp_path):
    import safetensors.torch

    source = open_clip_folder(tmp_path / "public")
    start = safetensors.torch.load_file(str(source / "open_clip_model.safetensors"))
    out = tmp_path / "run"
    code = rvl_main(["pretrain", "--data", str(phantoms), "--output-dir", str(out), "--init", f"local-dir:{source}",
                     "--lock-text", "--lr", "1e-3", "--pretrained-lr", "1e-5", "--max-steps", "4", "--batch-size", "8",
                     "--eval-every", "4", "--log-with", "none", "--cpu", "--seed", "1"])
    assert code == 0
    final = safetensors.torch.load_file(str(out / "model" / "open_clip_model.safetensors"))
    text_keys = [k for k in start if k.startswith(("transformer.", "token_embedding", "ln_final"))]
    assert text_keys and all(torch.equal(final[k], start[k]) for k in text_keys)  # locked: untouched
    visual = start["visual.conv1.weight"]
    moved = (final["visual.conv1.weight"] - visual).abs().max().item()
    assert 0 < moved < 4 * 1e-5 * 1.5  # AdamW moves each weight by at most ~lr per step: the pretrained lr was used
    summary = json.loads((out / "train_summary.json").read_text())
    parts = {row["part"]: row["source"] for row in summary["init"]}
    assert parts["image tower"] == f"local-dir:{source}" and parts["fusion"] == "new"
    locked = sum(v.numel() for k, v in start.items()
                 if k.startswith(("transformer.", "token_embedding.", "positional_embedding", "ln_final.",
                                  "text_projection")))
    assert sum(row["parameters"] for row in summary["init"]) - summary["trainable_parameters"] == locked


def test_unknown_init_is_a_clear_error(phantoms, tmp_path, capsys):
    code = rvl_main(["pretrain", "--data", str(phantoms), "--output-dir", str(tmp_path / "r"), "--model", "rvl-tiny",
                     "--init", "laion2b_nope", "--max-steps", "1", "--log-with", "none", "--cpu"])
    assert code == 2
    assert "laion2b_nope" in capsys.readouterr().err


def test_collapse_is_measured_against_the_start():
    from rvl.train_support import collapse_message, embedding_spread

    tokens = torch.arange(12).view(6, 2)
    start = embedding_spread(torch.randn(6, 4), torch.eye(6, 4) + 0.05, tokens)
    collapsed = embedding_spread(torch.randn(6, 4), torch.ones(6, 4) + 1e-4 * torch.randn(6, 4), tokens)
    assert collapsed["text_mean_cosine"] > 0.999 > start["text_mean_cosine"]
    message = collapse_message(collapsed, start, 0.1)
    assert "text embeddings collapsed" in message and "--lock-text" in message
    assert collapse_message(start, start, 0.1) is None
    assert collapse_message(collapsed, {}, 0.1) is None  # nothing pretrained: no reference, no verdict
    alike = {"study_mean_cosine": 0.97}  # a general-domain encoder finds all chest films alike from the start
    assert collapse_message({"study_mean_cosine": 0.975}, alike, 0.1) is None
    assert "study embeddings collapsed" in collapse_message({"study_mean_cosine": 0.999}, alike, 0.1)
    repeats = embedding_spread(torch.randn(4, 4), torch.randn(4, 4), torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]]))
    assert -1.0 <= repeats["text_mean_cosine"] <= 1.0  # two distinct texts: one pair


def test_locked_pretrained_text_tower_with_cached_features_and_compact_caption_vocab(phantoms, tmp_path):
    from public_models import tiny_bert
    from rvl.model import from_pretrained

    bert = tiny_bert(tmp_path / "bert")
    out = tmp_path / "run"
    code = rvl_main(["pretrain", "--data", str(phantoms), "--output-dir", str(out), "--model", "rvl-tiny",
                     "--text-tower", str(bert), "--lock-text", "--cache-text-features", "--caption-vocab", "train",
                     "--max-steps", "3", "--batch-size", "8", "--eval-every", "3", "--log-with", "none", "--cpu"])
    assert code == 0
    model = from_pretrained(out / "model").eval()
    decoder = model.caption_decoder
    assert decoder.compact and decoder.token_embed.num_embeddings < len(model.tokenizer.tokenizer)
    reports = ["FINDINGS: No pneumothorax. IMPRESSION: Mild cardiomegaly.", "Large right pleural effusion."]
    tokens = model.tokenize_reports(reports)
    with torch.no_grad():
        plain = model.encode_text(tokens)
        model.clip.text.lock(0)
        model.enable_text_feature_cache()
        cached = model.encode_text(tokens)
        again = model.encode_text(tokens)  # served from the cache
    assert torch.allclose(plain, cached, atol=1e-5) and torch.equal(cached, again)
    assert len(model._text_cache) == 2
    targets = decoder.targets(tokens)
    assert int(targets.max()) < decoder.token_embed.num_embeddings and decoder.target_pad_id == int(
        decoder.remap[model.pad_id])


def test_text_feature_cache_refuses_a_trainable_text_tower(tmp_path):
    from public_models import tiny_bert
    from rvl.model.sources import build_from_init

    model, _ = build_from_init("rvl-tiny", text_tower=str(tiny_bert(tmp_path / "bert")))
    with pytest.raises(ValueError, match="fully locked"):
        model.enable_text_feature_cache()


def test_sentence_pooling_is_the_mean_of_projected_sentences_and_survives_export(phantoms, tmp_path):
    """``--text-pooling sentences``: a report's embedding is the mean of its sentences' projected embeddings (cached or
    not), a one-sentence prompt is its own sentence, and the export embeds texts the same way."""
    from public_models import tiny_bert
    from rvl.model import from_pretrained

    out = tmp_path / "run"
    code = rvl_main(["pretrain", "--data", str(phantoms), "--output-dir", str(out), "--model", "rvl-tiny",
                     "--text-tower", str(tiny_bert(tmp_path / "bert")), "--lock-text", "--cache-text-features",
                     "--text-pooling", "sentences", "--max-steps", "2", "--batch-size", "8", "--eval-every", "2",
                     "--log-with", "none", "--cpu"])
    assert code == 0
    model = from_pretrained(out / "model").eval()
    assert model.rvl_cfg["text_pooling"] == "sentences"
    report, parts = "No pneumothorax. Mild cardiomegaly. Left effusion.", [
        "No pneumothorax.", "Mild cardiomegaly.", "Left effusion."]
    with torch.no_grad():
        whole = model.encode_text(model.tokenize_reports([report]), normalize=False)[0]
        pieces = model.encode_text(model.tokenize_reports(parts), normalize=False)
        model.clip.text.lock(0)
        model.enable_text_feature_cache()
        cached = model.encode_text(model.tokenize_reports([report]), normalize=False)[0]
    assert torch.allclose(whole, pieces.mean(0), atol=1e-5) and torch.allclose(whole, cached, atol=1e-5)
    assert len(model._text_cache) == 3  # the tower ran once per sentence, not once per report
    assert rvl_main(["pretrain", "--data", str(phantoms), "--output-dir", str(tmp_path / "bad"), "--model",
                     "rvl-tiny", "--text-pooling", "words", "--max-steps", "1", "--cpu"]) == 2
