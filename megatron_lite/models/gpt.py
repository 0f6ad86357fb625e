"""GPT-2: token embeddings (+ the position scheme's), a causal stack, tied output layer.

A Llama-family decoder is this model with other parts (rotary positions, RMSNorm,
SwiGLU, grouped-query attention: :mod:`megatron_lite.models.registry`) and, with
``model.untie_embeddings_and_output_weights``, an output layer of its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.attention import KVCache
from megatron_lite.models.embeddings import word_embedding
from megatron_lite.models.positions import position_scheme
from megatron_lite.models.transformer import Transformer, region_dropout
from megatron_lite.parallel import (
    ParallelContext,
    copy_to_tp_region,
    gather_sequence_for_head,
    linear_cross_entropy,
    scatter_to_sequence_region,
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
        self.cfg, self.tp_group, self.tp_size = cfg, ctx.tp_group, ctx.tp_size
        self.sp, self.rng = ctx.sequence_parallel, ctx.rng
        self.wte = word_embedding(cfg, ctx, device)
        self.padded_vocab_size = self.wte.num_embeddings
        self.positions = position_scheme(cfg)
        self.wpe = self.positions.input_table(device)  # learned positions; else None
        self.transformer = Transformer(cfg, ctx, causal=True, device=device)
        # untied: a vocab-parallel output layer of its own (Llama), drawn after the rest
        self.output_layer = (word_embedding(cfg, ctx, device)
                             if cfg.untie_embeddings_and_output_weights else None)

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
        # sequence parallelism: the sequence splits over TP unless this forward extends a
        # cache or a memory, or its length is not divisible by TP (then plain TP)
        sp = self.sp.begin(input_ids.shape[1], self.tp_size,
                           plain=cache is not None or memory is not None)
        if sp and self.wpe is None:  # the embedding's reduction is the scatter
            x = self.positions.embed(None, self.wte(input_ids, scatter_sequence=True))
        else:  # a position table is added to all of it first (as Megatron-core does)
            x = self.positions.embed(self.wpe, self.wte(input_ids), cache, memory)  # [b, s, h]
            if sp:
                x = scatter_to_sequence_region(x, self.tp_group)  # [b, s/tp, h]
        x = region_dropout(x, self.cfg.hidden_dropout, self.training, self.rng, self.sp)
        x = self.transformer(x, cache=cache, memory=memory)  # [b, s, h] (or s/tp)
        return self.logits(x) if labels is None else self.loss(x, labels, reduction)

    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's ``[V/tp, h]`` output layer: the word embedding (tied) or its own."""
        return self.wte.weight if self.output_layer is None else self.output_layer.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer: ``[b, s, h]`` -> this rank's ``[b, s, V/tp]`` logits.
        (Sequence parallelism: ``x`` is this rank's ``[b, s/tp, h]``, all-gathered here
        by :func:`gather_sequence_for_head`, whose backward reduce-scatters.)"""
        if self.sp.active:
            return F.linear(gather_sequence_for_head(x, self.sp, self.tp_group),
                            self.output_weight)
        return F.linear(copy_to_tp_region(x, self.tp_group), self.output_weight)

    def loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
             ) -> torch.Tensor:
        """The next-token loss of the final hidden states ``x``: the tied output layer and
        the vocab-parallel cross-entropy in chunks of ``model.loss_chunk_tokens`` tokens
        (:func:`linear_cross_entropy`: the full logits never exist). The output layer is
        :attr:`output_weight` (tied or Llama's own); under sequence parallelism ``x`` is
        this rank's ``[b, s/tp, h]``, gathered first (the gather's backward reduce-scatters
        the partial input gradient, in place of the layer's TP all-reduce)."""
        gathered = self.sp.active
        x = gather_sequence_for_head(x, self.sp, self.tp_group)
        return linear_cross_entropy(x, self.output_weight, labels, self.tp_group,
                                    vocab_size=self.cfg.vocab_size, reduction=reduction,
                                    chunk_tokens=self.cfg.loss_chunk_tokens,
                                    input_is_gathered=gathered)
