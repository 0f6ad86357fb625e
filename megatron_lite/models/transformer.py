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
from megatron_lite.parallel import ParallelContext, checkpoint


class Sublayer(nn.Module):
    """A residual sublayer: ``x + drop(F(LN(x)))`` (pre-LN) or ``LN(x + drop(F(x)))`` (post)."""

    def __init__(self, kind: str, cfg: ModelConfig, ctx: ParallelContext, causal: bool,
                 device=None):
        super().__init__()
        self.kind = kind
        self.post_ln = cfg.layernorm_order == "post"
        self.dropout_p = cfg.hidden_dropout
        self.ln = norm(cfg, device)
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
                return x + F.dropout(out, self.dropout_p, self.training)

            def body(h):
                return self.attn(h, mask, cache, index, z, *pos)
        if self.post_ln:
            return self.ln(x + F.dropout(body(x), self.dropout_p, self.training))
        return x + F.dropout(body(self.ln(x)), self.dropout_p, self.training)


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
        self.final_ln = norm(cfg, device) if cfg.layernorm_order == "pre" else None
        self.layerdrop = LayerDrop(cfg, ctx.dp_rank)
        self.positions = position_scheme(cfg)
        shared = self.positions.stack_module(ctx, device)  # e.g. Transformer-XL's u, v
        if shared is not None:
            self.add_module(self.positions.stack_attr, shared)

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


