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


def _binarise(labels: torch.Tensor, uncertain_as: float) -> torch.Tensor:
    return (labels == POSITIVE) | ((labels == UNCERTAIN) & (uncertain_as == POSITIVE))


def label_compatibility(study_labels: torch.Tensor, text_labels: torch.Tensor,
                        text_is_sentence: torch.Tensor | None = None, uncertain_as: float = POSITIVE) -> torch.Tensor:
    """Which texts describe which studies, from labels: bool [a, b] for studies [a, 14] and texts [b, 14].

    Labels are CheXpert-style (1/0/-1/NaN), binarised as positive (uncertain too when ``uncertain_as`` is positive).
    A whole report states every observation (blank = absent, the CheXpert reading); a sentence states only the
    observations it mentions. A study and a text are compatible when the study agrees with every observation the
    text states. A study with no labelled value, or a text stating nothing, is compatible with nothing here (its own
    pair is added by the caller), so unlabelled batches fall back to one-hot InfoNCE targets.
    """
    study_pos, text_pos = _binarise(study_labels.float(), uncertain_as), _binarise(text_labels.float(), uncertain_as)
    text_known = ~torch.isnan(text_labels.float())
    states_any = text_known.any(-1)
    if text_is_sentence is None:
        text_is_sentence = torch.zeros_like(states_any)
    text_known = text_known | (~text_is_sentence.bool() & states_any).unsqueeze(-1)
    agree = (study_pos.unsqueeze(1) == text_pos.unsqueeze(0)) | ~text_known.unsqueeze(0)
    study_known = ~torch.isnan(study_labels.float()).all(-1)
    return agree.all(-1) & study_known.unsqueeze(1) & states_any.unsqueeze(0)


def label_match_targets(labels: torch.Tensor, all_labels: torch.Tensor, row_offset: int,
                        uncertain_as: float = POSITIVE, all_is_sentence: torch.Tensor | None = None) -> torch.Tensor:
    """Soft targets [b, N]: row i spreads its mass evenly over the columns compatible with it (and always its own
    pair, column ``i + row_offset``); see :func:`label_compatibility`.

    ``labels`` [b, 14] are this rank's rows, ``all_labels`` [N, 14] the columns (the global batch). For two whole
    reports compatibility is equality of the binarised label vectors, so the matrix is symmetric.
    """
    return _spread_over_matches(label_compatibility(labels, all_labels, all_is_sentence, uncertain_as), row_offset)


def _spread_over_matches(match: torch.Tensor, row_offset: int) -> torch.Tensor:
    """Bool [b, N] matches -> row-normalised targets, each row i always matching its own pair ``i + row_offset``."""
    idx = torch.arange(match.shape[0], device=match.device)
    match[idx, idx + row_offset] = True
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

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values.contiguous())  # labels need no gradient
        return torch.cat(parts)

    def contrastive(self, study: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    labels: torch.Tensor | None = None, text_labels: torch.Tensor | None = None,
                    text_is_sentence: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the global batch; rows are this rank's studies/reports.

        With ``labels`` and a label-aware weight, targets mix one-hot with label-compatibility soft targets; the
        texts carry ``text_labels`` (default: the study labels) and may be single sentences (``text_is_sentence``).
        """
        logits_per_study, logits_per_text = self.get_logits(study, text, logit_scale)
        hard = self.get_ground_truth(study.device, logits_per_study.shape[0])
        if labels is None or self.label_aware_weight <= 0:
            return (F.cross_entropy(logits_per_study, hard) + F.cross_entropy(logits_per_text, hard)) / 2
        offset = self.rank * study.shape[0] if self.world_size > 1 else 0
        text_labels = labels if text_labels is None else text_labels
        if text_is_sentence is None:
            text_is_sentence = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        sentence_flags = text_is_sentence.to(device=labels.device, dtype=torch.uint8)
        all_text_labels, all_sentence = self._gather(text_labels), self._gather(sentence_flags).bool()
        all_study_labels = self._gather(labels)
        per_study = label_match_targets(labels, all_text_labels, offset, all_is_sentence=all_sentence)
        # text -> study rows: this rank's texts against every study (the same compatibility, read by column)
        per_text = _spread_over_matches(label_compatibility(all_study_labels, text_labels, sentence_flags.bool()).T,
                                        offset)
        one_hot = F.one_hot(hard, logits_per_study.shape[1]).to(per_study.dtype)
        weight = self.label_aware_weight
        return (F.cross_entropy(logits_per_study, (1 - weight) * one_hot + weight * per_study)
                + F.cross_entropy(logits_per_text, (1 - weight) * one_hot + weight * per_text)) / 2

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
                output_dict: bool = True, text_labels: torch.Tensor | None = None,
                text_is_sentence: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``model_out`` from :meth:`rvl.model.RVLModel.forward` -> {"contrastive", "caption", "label_head", "total"}.

        ``labels`` are the studies' CheXpert values; ``text_labels`` / ``text_is_sentence`` describe the texts when
        some of them are single report sentences (``rvl.text_sampling``); by default the texts are the reports.
        """
        losses: dict[str, torch.Tensor] = {}
        total = model_out["study_features"].new_zeros(())
        if labels is not None and text_labels is None:
            text_labels = labels
        if self.contrastive_weight > 0:
            losses["contrastive"] = self.contrastive(model_out["study_features"].float(),
                                                     model_out["text_features"].float(),
                                                     model_out["logit_scale"].float(), labels, text_labels,
                                                     text_is_sentence)
            total = total + self.contrastive_weight * losses["contrastive"]
        if self.caption_weight > 0 and "caption_logits" in model_out:
            losses["caption"] = self.caption(model_out["caption_logits"],
                                             model_out.get("caption_targets", model_out["text"]))
            total = total + self.caption_weight * losses["caption"]
        if self.label_head_weight > 0 and labels is not None and "study_label_logits" in model_out:
            losses["label_head"] = (self.label_bce(model_out["study_label_logits"], labels)
                                    + self.label_bce(model_out["text_label_logits"], text_labels)) / 2
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
