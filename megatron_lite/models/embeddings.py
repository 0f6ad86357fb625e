"""The embedding tables: the vocab-parallel word embedding (also the tied output layer)
and replicated tables (positions, token types)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.parallel import (
    ParallelContext,
    VocabParallelEmbedding,
    normal_init,
    pad_vocab_size,
)


def word_embedding(cfg: ModelConfig, ctx: ParallelContext, device=None):
    """The vocab-parallel token embedding (also the tied output layer), vocab padded to
    ``make_vocab_size_divisible_by x TP``; only the real vocab rows are drawn."""
    padded = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, ctx.tp_size)
    return VocabParallelEmbedding(padded, cfg.hidden_size, init_method=normal_init(cfg.init_std),
                                  vocab_size=cfg.vocab_size, tp_group=ctx.tp_group,
                                  device=device)


def embedding(num: int, dim: int, std: float, device=None) -> nn.Embedding:
    """A replicated ``nn.Embedding`` initialized N(0, std) (one draw, no default init)."""
    weight = torch.empty(num, dim, device=device)
    if weight.device.type != "meta":
        nn.init.normal_(weight, mean=0.0, std=std)
    return nn.Embedding(num, dim, _weight=weight)
