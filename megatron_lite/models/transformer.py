"""The transformer stack shared by GPT and BERT, assembled from its parts.

The stack is a list of residual *sublayers* read from a pattern, bottom to top:
``s`` = self-attention, ``f`` = feed-forward. ``"sf" * N`` is an ordinary N-layer
transformer; other orders (sandwich, PAR) are just other strings. Each sublayer is
self-contained: its own norm, residual and dropout.

What a sublayer is made of is chosen by config (:mod:`megatron_lite.models.registry`):
the attention (:mod:`.attention`, with its core and the position scheme's part), the MLP
(:mod:`.mlp`), the normalization (:mod:`.norms`); the position scheme also gives the
stack its shared parameters and each forward its per-sublayer inputs (a memory).

Tensor parallelism (Megatron 2019): attention is split by heads (fused QKV is
column-parallel with stride 3, the output projection row-parallel); the MLP is
column-parallel then row-parallel. One all-reduce per sublayer forward, one backward.

Sequence parallelism (Korthikanti et al. 2022, ``parallel.sequence_parallel``): between
the TP cores (norms, dropouts, residual adds) each TP rank holds only its slice of the
sequence, ``[b, s/tp, h]``; the cores are entered through an all-gather and left through
a reduce-scatter (:mod:`megatron_lite.parallel.mappings`). The norms' parameters sum
their gradients over TP (:func:`~megatron_lite.parallel.mark_sequence_parallel`), and the
dropouts there draw from the TP-region stream (the ranks' tokens differ). The model
decides per forward whether it splits (:class:`~megatron_lite.parallel.SequenceParallel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.attention import KVCache, SelfAttention
from megatron_lite.models.layerdrop import LayerDrop, zero_touch
from megatron_lite.models.mlp import mlp
from megatron_lite.models.norms import norm
from megatron_lite.models.positions import position_scheme
from megatron_lite.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    checkpoint,
    mark_sequence_parallel_module,
)


def region_dropout(x: torch.Tensor, p: float, training: bool, ctx_rng, sp) -> torch.Tensor:
    """Dropout between the TP cores: ``F.dropout`` on the default stream (replicated
    activations: the same mask on every TP rank), or, while sequence parallelism splits
    the sequence, the TP-region stream (:meth:`TPRNGTracker.dropout`: each rank's tokens
    get their own mask; activation checkpointing restores both streams)."""
    if sp.active:
        return ctx_rng.dropout(x, p, training)
    return F.dropout(x, p, training)


class Sublayer(nn.Module):
    """A residual sublayer: ``x + drop(F(LN(x)))`` (pre-LN) or ``LN(x + drop(F(x)))`` (post)."""

    def __init__(self, kind: str, cfg: ModelConfig, ctx: ParallelContext, causal: bool,
                 device=None):
        super().__init__()
        self.kind = kind
        self.post_ln = cfg.layernorm_order == "post"
        self.dropout_p = cfg.hidden_dropout
        self.rng, self.sp = ctx.rng, ctx.sequence_parallel
        self.ln = mark_sequence_parallel_module(norm(cfg, device), self.sp, ctx.tp_group)
        if kind == "s":
            self.attn = SelfAttention(cfg, ctx, causal, device)
        elif kind == "f":
            self.mlp = mlp(cfg, ctx, device)
        else:
            raise ValueError(f"unknown sublayer kind {kind!r} (expected 's' or 'f')")

    def core_inputs(self) -> torch.Tensor | None:
        """The attention core's inputs for this forward (:meth:`AttentionCore.inputs`)."""
        return self.attn.attention_core.inputs() if self.kind == "s" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, index: int = 0, z: torch.Tensor | None = None,
                *pos) -> torch.Tensor:
        """``z``: the attention core's inputs (:meth:`core_inputs`, computed by the caller
        outside any checkpoint); ``pos``: the position scheme's per-sublayer inputs
        (:meth:`Segment.inputs`), e.g. a memory of earlier segments to attend to as well."""
        if self.kind == "f":
            body = self.mlp
        else:
            src, pos = self.attn.positions.attention_input(x, self.attn, pos)
            if src is not x:  # more positions than x (a memory): pre-LN only, validated
                out = self.attn(self.ln(src), mask, cache, index, z, *pos)
                return x + self.dropout(out)

            def body(h):
                return self.attn(h, mask, cache, index, z, *pos)
        if self.post_ln:
            return self.ln(x + self.dropout(body(x)))
        return x + self.dropout(body(self.ln(x)))

    def dropout(self, y: torch.Tensor) -> torch.Tensor:
        return region_dropout(y, self.dropout_p, self.training, self.rng, self.sp)


class Transformer(nn.Module):
    """The sublayer stack (plus the final LayerNorm of a pre-LN model).

    ``activation_checkpointing``: ``full`` keeps only each sublayer's input and
    recomputes the rest in backward; ``selective`` recomputes only the attention core
    (softmax and its dropout), Megatron's cheapest memory saving. ``layerdrop`` and
    ``layers_to_keep`` skip sublayers (:mod:`megatron_lite.models.layerdrop`).
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, causal: bool, device=None):
        super().__init__()
        self.rng = ctx.rng
        self.full_checkpoint = cfg.activation_checkpointing == "full"
        self.layers = nn.ModuleList(Sublayer(k, cfg, ctx, causal, device) for k in cfg.pattern)
        self.final_ln = mark_sequence_parallel_module(norm(cfg, device), ctx.sequence_parallel,
                                                      ctx.tp_group) \
            if cfg.layernorm_order == "pre" else None
        self.layerdrop = LayerDrop(cfg, ctx.dp_rank)
        self.positions = position_scheme(cfg)
        shared = self.positions.stack_module(ctx, device)  # e.g. Transformer-XL's u, v
        if shared is not None:
            self.add_module(self.positions.stack_attr, shared)
        if ctx.sequence_parallel.enabled:
            plain = [name for name, m in self.layers.named_modules()
                     if isinstance(m, ColumnParallelLinear | RowParallelLinear)
                     and m.sequence_parallel is None]
            if plain:  # it would compute on a slice of the sequence as if it were all
                raise ValueError(
                    f"parallel.sequence_parallel: the tensor-parallel layer layers.{plain[0]}"
                    " was built without it (pass sequence_parallel=ctx.sequence_parallel)")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, memory=None) -> torch.Tensor:
        """``cache`` (inference): attend to the cached positions too, and add this input's.
        ``memory`` (a position scheme that carries one): attend to it too, and stage this
        segment's inputs."""
        grad = self.training and torch.is_grad_enabled()
        recompute = self.full_checkpoint and grad
        run = self.layerdrop.plan(len(self.layers), self.training)
        segment = self.positions.segment(self, memory)
        skipped = None  # zero terms giving the skipped sublayers' parameters a gradient
        for i, layer in enumerate(self.layers):
            pos = segment.inputs(i, layer, x)  # also when skipped (a memory stages x)
            # NOTE: the core's inputs (adaptive spans) enter checkpointed regions as an
            # input, not read inside: a parameter read inside a reentrant checkpoint and
            # again outside (the span penalty) would get two gradient writes, which DDP
            # and ZeRO refuse
            z = layer.core_inputs()
            if run is not None and not run[i]:
                if grad:
                    skipped = zero_touch(layer) + (0.0 if skipped is None else skipped)
            elif recompute:
                x = checkpoint(layer, self.rng, x, mask, None, i, z, *pos)
            else:
                x = layer(x, mask, cache, i, z, *pos)
        segment.close()
        shared = getattr(self, self.positions.stack_attr, None)
        if skipped is not None and shared is not None:  # it may have no other use
            skipped = skipped + zero_touch(shared)
        if skipped is not None:
            x = x + skipped.to(x.dtype)
        if cache is not None:
            cache.length += x.shape[1]
        return x if self.final_ln is None else self.final_ln(x)

    def training_hooks(self, cfg) -> list:
        """What training needs for this stack: its LayerDrop's hooks."""
        return self.layerdrop.training_hooks(cfg)


