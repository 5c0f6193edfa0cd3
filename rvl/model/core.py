"""The multi-view study/report model: open_clip towers + view-type embedding + masked fusion + caption decoder.

Each real view of a study goes through the shared open_clip image tower once (missing slots are never encoded), gets
a learned view-type embedding (PA/AP/LATERAL/LL/OTHER) and the views are fused with a mask: attention pooling
(default) or the masked mean. Patch tokens of the views feed the report decoder and, projected into the joint space,
grounding heatmaps (:meth:`RVLModel.encode_patches`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rvl.constants import CHEXPERT_LABELS
from rvl.model.heads import AttentionPool, CaptionDecoder, masked_mean

__all__ = ["RVLModel", "report_text_for_model"]


def report_text_for_model(report: str) -> str:
    """Text fed to the text tower: findings + impression sections when present, else the whole report."""
    try:
        from rvl.nlp import extract_sections
    except ImportError:  # the NLP package is optional for the model
        return " ".join(str(report).split())
    sections = extract_sections(str(report)) or {}
    parts = [sections.get(name, "").strip() for name in ("findings", "impression")]
    parts = [p for p in parts if p]
    return " ".join(" ".join(parts).split()) if parts else " ".join(str(report).split())


def _is_timm_avg_linear(vision_cfg: dict) -> bool:
    """True for an open_clip timm tower whose pooled embedding is a linear projection of the averaged feature map."""
    return bool(vision_cfg.get("timm_model_name")) and vision_cfg.get("timm_pool", "avg") == "avg" \
        and vision_cfg.get("timm_proj", "linear") == "linear"


class RVLModel(nn.Module):
    """Study encoder + report encoder in a joint space, plus the report-generation decoder."""

    def __init__(self, clip: nn.Module, tokenizer: Callable, model_cfg: dict, rvl_cfg: dict):
        super().__init__()
        import open_clip

        self.clip = clip
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.rvl_cfg = rvl_cfg
        dim = int(model_cfg["embed_dim"])
        self.view_types = list(rvl_cfg["view_types"])
        self._text_cache: dict[bytes, torch.Tensor] | None = None  # see enable_text_feature_cache
        self.view_type_embed = nn.Embedding(len(self.view_types), dim)
        # zero for a public model's start, so a single view keeps exactly its pretrained embedding
        nn.init.normal_(self.view_type_embed.weight, std=float(rvl_cfg.get("view_embed_std", 0.02)))
        # one classifier for both modalities, built only when the label_head objective trains it (an unused parameter
        # would break DDP's gradient reduction)
        self.label_head = nn.Linear(dim, len(CHEXPERT_LABELS)) if rvl_cfg.get("label_head") else None
        self.fusion = AttentionPool(dim, rvl_cfg.get("fusion_heads", 4)) if rvl_cfg["fusion"] == "attention" else None
        if rvl_cfg["fusion"] not in ("attention", "mean"):
            raise ValueError(f"rvl_cfg.fusion must be 'attention' or 'mean', got {rvl_cfg['fusion']!r}")
        # where the per-location tokens come from: open_clip's ViT (patch tokens) or a timm CNN tower with average
        # pooling and a linear projection (feature-map cells); other towers give one pooled token per view
        self._vit = isinstance(clip.visual, open_clip.transformer.VisionTransformer) and clip.visual.proj is not None
        self._timm_map = _is_timm_avg_linear(model_cfg.get("vision_cfg", {}))
        if self._vit:
            memory_dim = clip.visual.proj.shape[0]
        elif self._timm_map:
            memory_dim = clip.visual.trunk.num_features
        else:
            memory_dim = dim
        hf_tok = getattr(tokenizer, "tokenizer", None)
        vocab_size = len(hf_tok) if hf_tok is not None else int(getattr(tokenizer, "vocab_size", 49408))
        self.pad_id = int(hf_tok.pad_token_id) if hf_tok is not None else 0
        self.caption_decoder = self._caption_decoder(vocab_size, memory_dim, int(tokenizer.context_length))
        pp = clip.visual.preprocess_cfg
        size = clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = dim
        transform = functools.partial(open_clip.image_transform, self.image_size, mean=pp["mean"], std=pp["std"],
                                      interpolation=pp.get("interpolation"), resize_mode=pp.get("resize_mode"))
        self.preprocess = transform(is_train=False)
        self.preprocess_train = transform(is_train=True)

    @property
    def additive_patches(self) -> bool:
        """True when the unnormalised patch embeddings average exactly to the view embedding (timm CNN tower): a
        cell's dot product with a text embedding is then its share of the image-text similarity (a CAM)."""
        return self._timm_map

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    # ---------------------------------------------------------------- image side
    def _encode_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, 3, H, W] -> (pooled [N, D] unnormalised, tokens [N, P, W] after ln_post)."""
        visual = self.clip.visual
        if self._timm_map:  # same steps as open_clip TimmModel.forward, keeping the feature map [N, C, h, w]
            features = visual.trunk.forward_features(images)
            pooled = visual.head(visual.trunk.forward_head(features))
            return pooled, (features.flatten(2).transpose(1, 2) if features.ndim == 4 else features)
        if not self._vit:
            pooled = self.clip.encode_image(images)
            return pooled, pooled.unsqueeze(1)
        # same steps as open_clip VisionTransformer.forward, keeping the patch tokens from the same pass
        x = visual.transformer(visual._embeds(images))
        pooled, tokens = visual._pool(x)
        return pooled @ visual.proj, tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """One view per row: images [N, 3, H, W] -> [N, D]."""
        pooled, _ = self._encode_views(images)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_patches(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Patch tokens projected into the joint space: [N, 3, H, W] -> [N, gh, gw, D] (grounding heatmaps).

        For a timm CNN tower with average pooling and a linear projection the cells of the last feature map go
        through the same projection, so they average exactly to the view embedding (a class-activation map).
        """
        if self._timm_map:
            features = self.clip.visual.trunk.forward_features(images)
            if features.ndim != 4:
                raise NotImplementedError("encode_patches needs a timm trunk with a 2-D feature map (a CNN)")
            patches = self.clip.visual.head(features.permute(0, 2, 3, 1))
        elif self._vit:
            _, tokens = self._encode_views(images)
            grid = self.clip.visual.grid_size
            patches = (tokens @ self.clip.visual.proj).reshape(tokens.shape[0], grid[0], grid[1], -1)
        else:
            raise NotImplementedError("encode_patches needs an open_clip ViT or a timm tower with timm_pool 'avg' "
                                      "and timm_proj 'linear'")
        return F.normalize(patches, dim=-1) if normalize else patches

    def encode_study(self, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor,
                     normalize: bool = True, return_tokens: bool = False):
        """images [B, V, 3, H, W], view_mask [B, V] bool, view_types [B, V] long -> study embedding [B, D].

        Only the real views go through the image tower; missing slots never enter the fusion (masked, not zeros).
        With ``return_tokens`` also returns (tokens [B, V*P, W], token_valid [B, V*P], token_view_types [B, V*P]).
        """
        view_mask = view_mask.bool()
        if not bool(view_mask.any(1).all()):
            raise ValueError("every study needs at least one real view (view_mask row all False)")
        batch, num_views = view_mask.shape
        pooled, tokens = self._encode_views(images[view_mask])
        per_view = pooled.new_zeros(batch, num_views, pooled.shape[-1])
        per_view[view_mask] = pooled
        per_view = per_view + self.view_type_embed(view_types.clamp(0, len(self.view_types) - 1))
        fused = self.fusion(per_view, view_mask) if self.fusion is not None else masked_mean(per_view, view_mask)
        fused = F.normalize(fused, dim=-1) if normalize else fused
        if not return_tokens:
            return fused
        num_tokens = tokens.shape[1]
        all_tokens = tokens.new_zeros(batch, num_views, num_tokens, tokens.shape[-1])
        all_tokens[view_mask] = tokens
        valid = view_mask.unsqueeze(-1).expand(-1, -1, num_tokens).reshape(batch, -1)
        token_types = view_types.unsqueeze(-1).expand(-1, -1, num_tokens).reshape(batch, -1)
        return fused, (all_tokens.reshape(batch, num_views * num_tokens, -1), valid, token_types)

    # ---------------------------------------------------------------- text side
    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """tokens [B, L] (from ``self.tokenizer``) -> [B, D]."""
        if self.rvl_cfg.get("text_pooling", "report") == "sentences":
            features = self._sentence_bag(tokens)
        elif self._text_cache is None:
            return self.clip.encode_text(tokens, normalize=normalize)
        else:
            features = self.clip.text.proj(self._pooled_text(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def _sentence_bag(self, tokens: torch.Tensor) -> torch.Tensor:
        """``text_pooling: sentences``: each sentence of a text through the HF tower and the projection on its own,
        then the mean over the text's sentences.

        Why: mean-pooled over a whole report, a sentence encoder blurs a dozen statements (most of them negations)
        into one vector, and "no pleural effusion" lands next to "pleural effusion". Projected one by one, a negated
        sentence and a finding's sentence can go to different places, and a report becomes the sum of what its
        sentences state; a one-sentence prompt is one term of that sum. Sentences are cut at the tokenizer's "."
        and ";" tokens, so the tokens (and the caption decoder's targets) stay those of the whole report.
        """
        text = self.clip.text
        if not hasattr(text, "transformer"):
            raise ValueError("text_pooling: sentences needs a Hugging Face text tower (text_cfg.hf_model_name)")
        hf = self.tokenizer.tokenizer
        cls_id, sep_id, pad_id = hf.cls_token_id, hf.sep_token_id, hf.pad_token_id
        ends = {i for i in hf.convert_tokens_to_ids([".", ";"]) if i is not None and i != hf.unk_token_id}
        length = tokens.shape[1]
        rows: list[list[int]] = []
        owner: list[int] = []
        for b, row in enumerate(tokens.detach().cpu().tolist()):
            body = [t for t in row if t not in (cls_id, sep_id, pad_id)]
            sentences, current = [], []
            for t in body:
                current.append(t)
                if t in ends:
                    sentences.append(current)
                    current = []
            sentences = [s for s in [*sentences, current] if any(t not in ends for t in s)] or [[]]
            for sentence in sentences:
                ids = [cls_id, *sentence[:length - 2], sep_id]
                rows.append(ids + [pad_id] * (length - len(ids)))
                owner.append(b)
        rows_t = torch.tensor(rows, dtype=tokens.dtype, device=tokens.device)
        if self._text_cache is not None:
            pooled = self._pooled_text(rows_t)
        else:
            mask = (rows_t != pad_id).long()
            width = max(1, int(mask.sum(1).max()))  # sentences are short: run only up to the longest
            rows_t, mask = rows_t[:, :width], mask[:, :width]
            pooled = text.pooler(text.transformer(input_ids=rows_t, attention_mask=mask), mask)
        projected = text.proj(pooled)
        index = torch.tensor(owner, device=projected.device)
        summed = projected.new_zeros(tokens.shape[0], projected.shape[1]).index_add_(0, index, projected)
        counts = torch.bincount(index, minlength=tokens.shape[0]).clamp(min=1).to(projected.dtype)
        return summed / counts.unsqueeze(1)

    def enable_text_feature_cache(self) -> None:
        """Compute a locked HF text tower once per distinct text and keep its pooled output (only the projection
        trains). A fully locked transformer gives the same pooled features every time (eval mode, no dropout), so
        re-running it each step would only cost time: on 2 CPU cores it is most of a step with a 6-layer MiniLM."""
        text = getattr(self.clip, "text", None)
        if not (hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj")):
            raise ValueError("the text feature cache needs a Hugging Face text tower (text_cfg.hf_model_name)")
        if any(p.requires_grad for p in text.transformer.parameters()):
            raise ValueError("the text feature cache needs a fully locked text tower (--lock-text, no unlocked layers)")
        self._text_cache = {}

    @torch.no_grad()
    def _pooled_text(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = [row.tobytes() for row in tokens.detach().cpu().numpy()]
        new = list(dict.fromkeys(k for k in keys if k not in self._text_cache))
        if new:
            text = self.clip.text
            rows = tokens[[keys.index(k) for k in new]]
            was_training = text.training
            text.eval()
            try:
                # full padded width on purpose: trimmed to the batch's longest text, a report's features would depend
                # (in the last bits) on the batch it was first seen in, and a resumed run, whose cache starts empty,
                # would no longer end bit-identical to an uninterrupted one
                mask = (rows != text.config.pad_token_id).long()
                pooled = text.pooler(text.transformer(input_ids=rows, attention_mask=mask), mask).float().cpu()
            finally:
                text.train(was_training)
            self._text_cache.update(zip(new, pooled))
        return torch.stack([self._text_cache[k] for k in keys]).to(tokens.device)

    def tokenize_reports(self, texts: list[str]) -> torch.Tensor:
        """Reports -> token ids, using only the sections the model is trained on."""
        return self.tokenizer([report_text_for_model(t) for t in texts])

    @torch.no_grad()
    def encode_reports(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Normalised report/prompt embeddings [B, D], in eval mode without gradients (mode restored after)."""
        was_training = self.training
        self.eval()
        device = self.logit_scale.device
        try:
            out = [self.encode_text(self.tokenize_reports(texts[i:i + batch_size]).to(device))
                   for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=device)

    # ---------------------------------------------------------------- training forward
    def forward(self, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor, text: torch.Tensor,
                caption: bool = True) -> dict[str, torch.Tensor]:
        """Everything the objectives need, from one pass over each tower."""
        study, (tokens, valid, token_types) = self.encode_study(images, view_mask, view_types, normalize=False,
                                                               return_tokens=True)
        text_features = self.encode_text(text, normalize=False)
        out = {"study_features": F.normalize(study, dim=-1), "text_features": F.normalize(text_features, dim=-1),
               "logit_scale": self.logit_scale.exp(), "text": text}
        if self.label_head is not None:
            # on the unnormalised embeddings: on the unit sphere the logits are bounded by |W| and BCE learns slowly
            out["study_label_logits"], out["text_label_logits"] = self.label_head(study), self.label_head(text_features)
        if caption:
            out["caption_logits"] = self.caption_decoder(text, tokens, valid, token_types)
            out["caption_targets"] = self.caption_decoder.targets(text)
        return out

    @property
    def caption_pad_id(self) -> int:
        """Padding id of the caption targets (``forward(...)["caption_targets"]``), for the caption loss."""
        return self.caption_decoder.target_pad_id

    def restrict_caption_vocab(self, texts: list[str]) -> int:
        """Rebuild the caption decoder over the token ids that ``texts`` use (recorded in ``rvl_cfg`` so an export
        loads with the same shapes); returns the decoder's vocabulary size."""
        ids: set[int] = set()
        for start in range(0, len(texts), 256):
            ids.update(int(i) for i in torch.unique(self.tokenize_reports(texts[start:start + 256])))
        dec = self.caption_decoder
        self.rvl_cfg = {**self.rvl_cfg, "decoder": {**self.rvl_cfg["decoder"], "vocab_ids": sorted(ids)}}
        full_vocab = dec.remap.numel() if dec.compact else dec.token_embed.num_embeddings
        self.caption_decoder = self._caption_decoder(full_vocab, dec.memory_proj.in_features,
                                                     dec.pos_embed.shape[1]).to(self.logit_scale.device)
        return self.caption_decoder.token_embed.num_embeddings

    def _caption_decoder(self, vocab_size: int, memory_dim: int, context_length: int) -> CaptionDecoder:
        """The report decoder ``rvl_cfg["decoder"]`` describes (its compact vocabulary when ``vocab_ids`` is set)."""
        cfg = self.rvl_cfg["decoder"]
        return CaptionDecoder(vocab_size, memory_dim, context_length, width=cfg["width"], layers=cfg["layers"],
                              heads=cfg["heads"], mlp_ratio=cfg.get("mlp_ratio", 4.0),
                              num_view_types=len(self.view_types), pad_id=self.pad_id, vocab_ids=cfg.get("vocab_ids"))

    def save_pretrained(self, save_dir: str | Path) -> Path:
        """Export an open_clip-loadable folder + rvl sidecar (see :func:`rvl.model.export.save_pretrained`)."""
        from rvl.model.export import save_pretrained

        return save_pretrained(self, save_dir)
