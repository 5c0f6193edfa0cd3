"""Small heads on top of the open_clip towers: multi-view attention pooling and the report-generation decoder."""
from __future__ import annotations

import torch
import torch.nn as nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of ``x`` [B, V, D] using only the positions where ``mask`` [B, V] is True."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class AttentionPool(nn.Module):
    """Learned-query attention over the views of a study, on top of their masked mean.

    The output projection starts at zero, so an untrained pool equals the masked mean and attention learns only a
    correction (e.g. to weight a lateral view that shows a finding the frontal one hides).
    """

    def __init__(self, dim: int, num_heads: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, views: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """views [B, V, D], mask [B, V] (True = real view) -> [B, D]. Missing views get zero attention weight."""
        kv = self.norm(views)
        attended, _ = self.attn(self.query.expand(views.shape[0], -1, -1).to(views.dtype), kv, kv,
                                key_padding_mask=~mask, need_weights=False)
        return masked_mean(views, mask) + attended.squeeze(1)


class CaptionDecoder(nn.Module):
    """Transformer decoder generating the report from the fused view tokens (REFERS-style cross-supervision).

    Teacher-forced: ``forward(tokens)`` predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]`` with causal self-attention
    and cross-attention to the patch tokens of every real view (missing views are masked out of the memory).
    """

    def __init__(self, vocab_size: int, memory_dim: int, context_length: int, width: int = 128, layers: int = 1,
                 heads: int = 4, mlp_ratio: float = 4.0, num_view_types: int = 5, pad_id: int = 0,
                 vocab_ids: list[int] | None = None):
        super().__init__()
        self.pad_id = pad_id
        # A compact vocabulary: only the token ids the training reports use (plus one slot for any other id). A
        # pretrained tokenizer's 30k-entry output layer would otherwise cost more than both towers on a CPU.
        self.compact = vocab_ids is not None
        if self.compact:
            ids = sorted(set(int(i) for i in vocab_ids) | {pad_id})
            remap = torch.full((vocab_size,), len(ids), dtype=torch.long)
            remap[torch.tensor(ids)] = torch.arange(len(ids))
            self.register_buffer("remap", remap, persistent=False)
            vocab_size = len(ids) + 1
        self.target_pad_id = int(self.remap[pad_id]) if self.compact else pad_id
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.memory_proj = nn.Linear(memory_dim, width)
        self.view_embed = nn.Embedding(num_view_types, width)
        layer = nn.TransformerDecoderLayer(width, heads, int(width * mlp_ratio), dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_valid: torch.Tensor,
                memory_view_types: torch.Tensor) -> torch.Tensor:
        """tokens [B, L]; memory [B, M, memory_dim]; memory_valid [B, M] bool; memory_view_types [B, M] -> logits."""
        inputs = self.targets(tokens)[:, :-1]
        length = inputs.shape[1]
        x = self.token_embed(inputs) + self.pos_embed[:, :length]
        mem = self.memory_proj(memory) + self.view_embed(memory_view_types)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        x = self.decoder(x, mem, tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=~memory_valid)  # no pad mask: causal queries never see later pads
        return self.head(self.norm(x))

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids in the decoder's own vocabulary (the compact one when set; ``target_pad_id`` marks padding)."""
        return self.remap[tokens] if self.compact else tokens
