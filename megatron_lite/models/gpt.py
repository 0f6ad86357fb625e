"""GPT-2: token embeddings (+ the position scheme's), a causal stack, tied output layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.attention import KVCache
from megatron_lite.models.embeddings import word_embedding
from megatron_lite.models.positions import position_scheme
from megatron_lite.models.transformer import Transformer
from megatron_lite.parallel import (
    ParallelContext,
    copy_to_tp_region,
    linear_cross_entropy,
)


class GPTModel(nn.Module):
    """A GPT-2 language model with tensor-parallel layers (TP=1 = a plain model).

    Args:
        cfg: model section of the config.
        ctx: the parallel context (default: one process, no TP).
        device: where to allocate (``"meta"`` builds shapes only).
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None, device=None):
        super().__init__()
        ctx = ctx or ParallelContext()
        self.cfg, self.tp_group = cfg, ctx.tp_group
        self.wte = word_embedding(cfg, ctx, device)
        self.padded_vocab_size = self.wte.num_embeddings
        self.positions = position_scheme(cfg)
        self.wpe = self.positions.input_table(device)  # learned positions; else None
        self.transformer = Transformer(cfg, ctx, causal=True, device=device)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, memory=None, reduction: str = "mean"
                ) -> torch.Tensor:
        """Logits (this rank's vocab slice) or, with ``labels``, the loss (``reduction``:
        ``mean`` over the targets, ``sum`` or per-token ``none``).

        Args:
            input_ids: ``[b, s]`` token ids.
            labels: ``[b, s]`` next-token ids aligned with ``input_ids`` (Megatron's
                convention: the dataset shifts), ``-100`` where no loss is wanted.
            cache: a :class:`KVCache` for incremental decoding: ``input_ids`` continue the
                cached positions, and their keys/values are added to it.
            memory: a position scheme that carries one only (Transformer-XL): the memory
                of the previous segments (:meth:`PositionScheme.new_memory`), which
                ``input_ids`` continue; it is updated with this segment.
        """
        x = self.positions.embed(self.wpe, self.wte(input_ids), cache, memory)  # [b, s, h]
        x = F.dropout(x, self.cfg.hidden_dropout, self.training)
        x = self.transformer(x, cache=cache, memory=memory)  # [b, s, h]
        return self.logits(x) if labels is None else self.loss(x, labels, reduction)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output layer: ``[b, s, h]`` -> this rank's ``[b, s, V/tp]`` logits."""
        return F.linear(copy_to_tp_region(x, self.tp_group), self.wte.weight)

    def loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
             ) -> torch.Tensor:
        """The next-token loss of the final hidden states ``x``: the tied output layer and
        the vocab-parallel cross-entropy in chunks of ``model.loss_chunk_tokens`` tokens
        (:func:`linear_cross_entropy`: the full logits never exist)."""
        return linear_cross_entropy(x, self.wte.weight, labels, self.tp_group,
                                    vocab_size=self.cfg.vocab_size, reduction=reduction,
                                    chunk_tokens=self.cfg.loss_chunk_tokens)
