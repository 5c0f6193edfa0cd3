"""Training objectives: study-report contrastive (both directions, cross-rank negatives with gradients), label-aware
soft targets, and report generation (teacher-forced cross-entropy).

The contrastive part is open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``: features of every rank are
gathered with ``torch.distributed.nn.all_gather`` (differentiable; ``accelerator.gather`` is not), each rank scores
its local rows against all columns, and DDP's gradient averaging turns the per-rank means into the loss of the
concatenated global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from rvl.constants import POSITIVE, UNCERTAIN


def label_match_targets(labels: torch.Tensor, all_labels: torch.Tensor, row_offset: int,
                        uncertain_as: float = POSITIVE) -> torch.Tensor:
    """Soft targets [b, N]: each row spreads its mass evenly over the columns whose label vector equals its own.

    Labels are CheXpert-style [*, 14] with 1/0/-1/NaN. They are binarised (positive, or uncertain when
    ``uncertain_as`` is positive). A study with no labelled value at all only matches itself, so unlabelled batches
    reduce to the usual one-hot InfoNCE targets.
    """
    def binarise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        known = ~torch.isnan(x)
        pos = (x == POSITIVE) | ((x == UNCERTAIN) & (uncertain_as == POSITIVE))
        return pos, known.any(-1)

    pos_local, known_local = binarise(labels.float())
    pos_all, known_all = binarise(all_labels.float())
    match = (pos_local.unsqueeze(1) == pos_all.unsqueeze(0)).all(-1)
    match &= known_local.unsqueeze(1) & known_all.unsqueeze(0)
    eye = torch.zeros_like(match)
    idx = torch.arange(labels.shape[0], device=labels.device)
    eye[idx, idx + row_offset] = True
    match |= eye
    targets = match.float()
    return targets / targets.sum(1, keepdim=True)


class RVLLoss(ClipLoss):
    """Weighted sum of the objectives; each one is switched off by a weight of 0.

    Args:
        contrastive_weight: weight of the symmetric study<->report InfoNCE.
        label_aware_weight: in [0, 1]; mixes one-hot targets with label-match soft targets (MedCLIP-style: pairs
            whose label vectors match are not pushed apart as negatives). 0 = plain InfoNCE.
        caption_weight: weight of the report-generation cross-entropy.
        pad_id: token id ignored by the caption loss.
        label_head_weight: weight of the shared label classifier applied to both the study and the report
            embeddings (BCE against the known labels; uncertain counts as positive). Because one linear head scores
            both modalities, it pulls studies and reports with the same findings to the same side of each label's
            hyperplane in the joint space, which gives the contrastive objective a strong early signal.
        rank / world_size: this process in the data-parallel group (``accelerator.process_index`` / ``num_processes``).
    """

    def __init__(self, contrastive_weight: float = 1.0, label_aware_weight: float = 0.0, caption_weight: float = 0.0,
                 pad_id: int = 0, rank: int = 0, world_size: int = 1, label_head_weight: float = 0.0):
        super().__init__(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        self.label_head_weight = label_head_weight
        self.contrastive_weight = contrastive_weight
        self.label_aware_weight = label_aware_weight
        self.caption_weight = caption_weight
        self.pad_id = pad_id

    def _gather_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return labels
        parts = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(parts, labels.contiguous())  # labels need no gradient
        return torch.cat(parts)

    def contrastive(self, study: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the global batch; rows are this rank's studies/reports."""
        logits_per_study, logits_per_text = self.get_logits(study, text, logit_scale)
        hard = self.get_ground_truth(study.device, logits_per_study.shape[0])
        if labels is None or self.label_aware_weight <= 0:
            return (F.cross_entropy(logits_per_study, hard) + F.cross_entropy(logits_per_text, hard)) / 2
        offset = self.rank * study.shape[0] if self.world_size > 1 else 0
        soft = label_match_targets(labels, self._gather_labels(labels), offset)
        one_hot = F.one_hot(hard, logits_per_study.shape[1]).to(soft.dtype)
        targets = (1 - self.label_aware_weight) * one_hot + self.label_aware_weight * soft
        # the label-match matrix is symmetric, so the same rows serve the report->study direction
        return (F.cross_entropy(logits_per_study, targets) + F.cross_entropy(logits_per_text, targets)) / 2

    def caption(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy; logits [B, L-1, V] predict tokens[:, 1:] (pads ignored).

        Normalised by the token count of the *global* batch (times world size), so that DDP's gradient average over
        ranks equals the per-token mean of the concatenated batch even when ranks hold different numbers of tokens.
        """
        targets = tokens[:, 1:].reshape(-1)
        summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=self.pad_id,
                                 reduction="sum")
        count = (targets != self.pad_id).sum().float()
        if self.world_size > 1:
            dist.all_reduce(count)
            count = count / self.world_size
        return summed / count.clamp_min(1.0)

    def forward(self, model_out: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
                output_dict: bool = True) -> dict[str, torch.Tensor]:
        """``model_out`` from :meth:`rvl.model.RVLModel.forward` -> {"contrastive", "caption", "total"}."""
        losses: dict[str, torch.Tensor] = {}
        total = model_out["study_features"].new_zeros(())
        if self.contrastive_weight > 0:
            losses["contrastive"] = self.contrastive(model_out["study_features"].float(),
                                                     model_out["text_features"].float(),
                                                     model_out["logit_scale"].float(), labels)
            total = total + self.contrastive_weight * losses["contrastive"]
        if self.caption_weight > 0 and "caption_logits" in model_out:
            losses["caption"] = self.caption(model_out["caption_logits"], model_out["text"])
            total = total + self.caption_weight * losses["caption"]
        if self.label_head_weight > 0 and labels is not None and "study_label_logits" in model_out:
            losses["label_head"] = (self.label_bce(model_out["study_label_logits"], labels)
                                    + self.label_bce(model_out["text_label_logits"], labels)) / 2
            total = total + self.label_head_weight * losses["label_head"]
        losses["total"] = total
        return losses

    @staticmethod
    def label_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean BCE over the known (non-NaN) CheXpert labels; uncertain (-1) is treated as positive (U-Ones)."""
        known = ~torch.isnan(labels)
        target = ((labels == POSITIVE) | (labels == UNCERTAIN)).float()
        per_item = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        return (per_item * known).sum() / known.sum().clamp_min(1)
