"""Objectives: gradients from both contrastive directions, label-aware targets, and 2-process DDP == 1 process."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from rvl.constants import CHEXPERT_LABELS
from rvl.model.loss import RVLLoss, label_match_targets

BATCH, VIEWS = 8, 2


@pytest.fixture(scope="module")
def tiny():
    from rvl.model import create_model

    torch.manual_seed(0)
    return create_model("rvl-tiny")


def make_batch(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    mask = torch.ones(BATCH, VIEWS, dtype=torch.bool)
    mask[::3, 1] = False  # some single-view studies
    labels = torch.full((BATCH, len(CHEXPERT_LABELS)), float("nan"))
    labels[:, 2] = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.float)   # Cardiomegaly
    labels[:, 10] = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0], dtype=torch.float)  # Pleural Effusion
    reports = [f"Finding {i}: {'cardiomegaly' if labels[i, 2] == 1 else 'normal heart'}, "
               f"{'effusion' if labels[i, 10] == 1 else 'no effusion'} {i}" for i in range(BATCH)]
    return {"images": torch.randn(BATCH, VIEWS, 3, size, size, generator=g), "view_mask": mask,
            "view_types": torch.randint(0, 4, (BATCH, VIEWS), generator=g), "text": model.tokenize_reports(reports),
            "labels": labels}


def _grad_norms(model) -> tuple[float, float]:
    vis = sum(float(p.grad.abs().sum()) for p in model.clip.visual.parameters() if p.grad is not None)
    txt = sum(float(p.grad.abs().sum()) for p in model.clip.text.parameters() if p.grad is not None)
    return vis, txt


@pytest.mark.parametrize("direction", ["study_to_report", "report_to_study"])
def test_each_contrastive_direction_reaches_both_towers(tiny, direction):
    """REFERS's text->image term had no gradient (.item()); here each direction alone trains both towers."""
    batch = make_batch(tiny)
    tiny.zero_grad(set_to_none=True)
    out = tiny(batch["images"], batch["view_mask"], batch["view_types"], batch["text"], caption=False)
    logits_study, logits_text = RVLLoss().get_logits(out["study_features"], out["text_features"], out["logit_scale"])
    target = torch.arange(BATCH)
    loss = F.cross_entropy(logits_study if direction == "study_to_report" else logits_text, target)
    loss.backward()
    vis, txt = _grad_norms(tiny)
    assert vis > 0 and txt > 0
    assert tiny.logit_scale.grad is not None and tiny.logit_scale.grad.abs() > 0
    assert all(p.grad is None for p in tiny.caption_decoder.parameters())  # decoder untouched when caption is off


def test_plain_contrastive_equals_open_clip_cliploss(tiny):
    from open_clip import ClipLoss

    g = torch.Generator().manual_seed(1)
    s, t = F.normalize(torch.randn(6, 16, generator=g), dim=-1), F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ours = RVLLoss(label_aware_weight=0.0).contrastive(s, t, scale, labels=torch.ones(6, 14))
    assert torch.allclose(ours, ClipLoss()(s, t, scale))


def test_label_match_targets():
    nan = float("nan")
    labels = torch.tensor([[1, 0, nan], [1, nan, 0], [0, 1, nan], [nan, nan, nan], [-1, 0, 0]], dtype=torch.float)
    targets = label_match_targets(labels, labels, row_offset=0)
    # rows 0, 1 and 4 (uncertain counted positive) share the binarised vector [1, 0, 0]; rows 2 and 3 match only
    # themselves (3 has no labels at all)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    assert torch.allclose(targets[0], torch.tensor([1 / 3, 1 / 3, 0, 0, 1 / 3]))
    assert torch.equal(targets[2], torch.tensor([0.0, 0, 1, 0, 0]))
    assert torch.equal(targets[3], torch.tensor([0.0, 0, 0, 1, 0]))
    assert torch.allclose(targets, targets.T * (targets.sum(1, keepdim=True) / targets.sum(0, keepdim=True)))


def test_label_aware_loss_does_not_push_matching_pairs_apart():
    """Two studies with identical labels: swapping their reports costs nothing extra with full label-aware weight."""
    s = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    t_swapped = s[[1, 0, 2]]
    labels = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    scale = torch.tensor(20.0)
    hard, soft = RVLLoss(label_aware_weight=0.0), RVLLoss(label_aware_weight=1.0)
    hard_extra = hard.contrastive(s, t_swapped, scale, labels) - hard.contrastive(s, s, scale, labels)
    soft_extra = soft.contrastive(s, t_swapped, scale, labels) - soft.contrastive(s, s, scale, labels)
    assert hard_extra > 5.0  # plain InfoNCE punishes the swap as two false negatives
    assert abs(float(soft_extra)) < 1e-5


def test_label_head_bce_uses_known_labels_only_and_trains_both_towers():
    from rvl.model import create_model

    torch.manual_seed(0)
    model = create_model("rvl-tiny", label_head=True)
    batch = make_batch(model)
    loss_fn = RVLLoss(contrastive_weight=0.0, label_head_weight=1.0)
    out = model(batch["images"], batch["view_mask"], batch["view_types"], batch["text"], caption=False)
    losses = loss_fn(out, batch["labels"])
    # only the two labelled columns count: a blank (NaN) column with any logit changes nothing
    logits = out["study_label_logits"].detach().clone()
    expected = F.binary_cross_entropy_with_logits(logits[:, [2, 10]], batch["labels"][:, [2, 10]])
    assert torch.isclose(RVLLoss.label_bce(logits, batch["labels"]), expected)
    logits[:, 0] += 100.0
    assert torch.isclose(RVLLoss.label_bce(logits, batch["labels"]), expected)
    losses["total"].backward()
    vis, txt = _grad_norms(model)
    assert vis > 0 and txt > 0 and model.label_head.weight.grad.abs().sum() > 0
    assert create_model("rvl-tiny").label_head is None  # no unused parameter when the objective is off


def test_caption_loss_ignores_padding():
    loss_fn = RVLLoss(caption_weight=1.0, pad_id=0)
    tokens = torch.tensor([[2, 5, 6, 3, 0, 0]])
    logits = torch.randn(1, 5, 10)
    expected = F.cross_entropy(logits[0, :3], tokens[0, 1:4])
    assert torch.allclose(loss_fn.caption(logits, tokens), expected)
    logits_changed = logits.clone()
    logits_changed[0, 3:] += 100 * torch.randn(2, 10)  # positions predicting padding
    assert torch.allclose(loss_fn.caption(logits_changed, tokens), expected)


# ------------------------------------------------------------------------------------- 2 processes == 1 process
def _loss_and_grads(model, batch, rank: int, world: int):
    pad_id = getattr(model, "module", model).pad_id
    loss_fn = RVLLoss(contrastive_weight=1.0, label_aware_weight=0.5, caption_weight=0.7, pad_id=pad_id,
                      rank=rank, world_size=world)
    out = model(batch["images"], batch["view_mask"], batch["view_types"], batch["text"], caption=True)
    return loss_fn(out, batch["labels"])


def _ddp_main(model_dir: str, batch_path: str, result_path: str) -> None:
    """Run under ``torchrun --nproc_per_node 2``: each rank takes half of the batch."""
    from accelerate import Accelerator

    from rvl.model import from_pretrained

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, accelerator.state
    model = from_pretrained(model_dir).eval()
    batch = torch.load(batch_path)
    half = BATCH // world
    local = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
    ddp = accelerator.prepare(model)
    losses = _loss_and_grads(ddp, local, rank, world)
    losses["total"].backward()
    parts = {k: accelerator.reduce(v.detach(), "mean") for k, v in losses.items()}
    if accelerator.is_main_process:
        grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(ddp).named_parameters() if p.grad is not None}
        torch.save({"parts": parts, "grads": grads}, result_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def test_two_process_gloo_equals_one_process_on_concatenated_batch(tmp_path):
    """Cross-rank negatives with gradients: the 2-process loss and gradients equal 1 process on the whole batch."""
    import subprocess
    import sys

    from rvl.model import create_model, from_pretrained

    torch.manual_seed(0)
    create_model("rvl-tiny").save_pretrained(tmp_path / "model")
    model = from_pretrained(tmp_path / "model").eval()  # eval: no dropout, so both runs compute the same function
    batch = make_batch(model, seed=3)
    torch.save(batch, tmp_path / "batch.pt")
    reference = _loss_and_grads(model, batch, rank=0, world=1)
    reference["total"].backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # a fresh interpreter per rank (forking a process that already ran OpenMP kernels can deadlock)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
           __file__, str(tmp_path / "model"), str(tmp_path / "batch.pt"), str(tmp_path / "ddp.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    for key in ("total", "contrastive", "caption"):
        assert math.isclose(float(ddp["parts"][key]), float(reference[key].detach()), rel_tol=1e-5), key
    assert set(ddp["grads"]) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert torch.allclose(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6), name


if __name__ == "__main__":
    import sys

    _ddp_main(*sys.argv[1:4])


def test_sentence_texts_match_every_study_that_agrees_with_what_they_state():
    from rvl.model.loss import label_compatibility

    nan = float("nan")
    # columns: [cardiomegaly, effusion, pneumothorax]
    studies = torch.tensor([[1, 0, nan], [1, 1, 0], [nan, nan, nan]], dtype=torch.float)
    texts = torch.tensor([[nan, 0, nan],      # sentence "no pleural effusion"
                          [1, nan, nan],      # sentence "moderate cardiomegaly"
                          [nan, nan, nan],    # sentence stating nothing ("clear lungs" without a label)
                          [1, 0, nan]],       # whole report: blanks mean absent
                         dtype=torch.float)
    is_sentence = torch.tensor([True, True, True, False])
    compat = label_compatibility(studies, texts, is_sentence)
    assert compat.tolist() == [[True, True, False, True],
                               [False, True, False, False],
                               [False, False, False, False]]  # an unlabelled study matches nothing but its own pair
    targets = label_match_targets(studies, texts[:3], 0, all_is_sentence=is_sentence[:3])
    assert torch.allclose(targets[2], torch.tensor([0.0, 0, 1]))
    assert torch.allclose(targets.sum(1), torch.ones(3))


def test_sentence_aware_contrastive_reduces_to_report_targets_without_sentences():
    g = torch.Generator().manual_seed(3)
    s, t = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [float("nan"), float("nan")], [1, 1]])
    loss = RVLLoss(label_aware_weight=0.7)
    scale = torch.tensor(10.0)
    plain = loss.contrastive(s, t, scale, labels)
    same = loss.contrastive(s, t, scale, labels, text_labels=labels, text_is_sentence=torch.zeros(5, dtype=torch.bool))
    assert torch.allclose(plain, same)
    # the same label vectors read as sentences that state only their first column: more pairs match, the loss moves
    sentences = labels.clone()
    sentences[:, 1] = float("nan")
    other = loss.contrastive(s, t, scale, labels, text_labels=sentences,
                             text_is_sentence=torch.ones(5, dtype=torch.bool))
    assert not torch.allclose(plain, other)
