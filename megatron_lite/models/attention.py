"""Self-attention with heads split over the TP group, and its cores.

:class:`SelfAttention` owns the projections (fused QKV column-parallel with stride 3, the
output row-parallel: Megatron 2019), the KV cache and selective recomputation. What
varies is plugged in:

- the position scheme (:mod:`megatron_lite.models.positions`) adds its parameters and
  turns queries, keys and the mask into what the core sees (:meth:`PositionScheme.attend`);
- the *core* computes ``softmax(q k^T / sqrt(d)) v`` with dropout: a module registered in
  :data:`~megatron_lite.models.registry.ATTENTION_CORES` (``sdpa`` and ``math`` here;
  ``adaptive_span`` in :mod:`megatron_lite.models.adaptive_span`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.positions import position_scheme
from megatron_lite.models.registry import ATTENTION_CORES, Part
from megatron_lite.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    SharedColumnLinear,
    checkpoint,
    normal_init,
)


class KVCache:
    """Keys and values of the tokens seen so far, per attention sublayer (incremental decoding).

    Each TP rank caches only its own heads. ``length`` is the number of cached positions.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def extend(self, index: int, k: torch.Tensor, v: torch.Tensor):
        """Append ``[b, heads, s, d]`` keys/values for sublayer ``index``; return all of them."""
        if self.capacity is None:
            if index in self.layers:
                past_k, past_v = self.layers[index]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            self.layers[index] = (k, v)
            return k, v
        past, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions exceed its capacity {self.capacity}")
        if index not in self.layers:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.layers[index] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self.layers[index]
        keys[:, :, past:end] = k
        values[:, :, past:end] = v
        return keys[:, :, :end], values[:, :, :end]


class AttentionCore(nn.Module, Part):
    """``forward(q, k, v, mask, causal, z)`` -> ``[b, heads/tp, qlen, d]``: the heads'
    outputs for queries ``[b, heads/tp, qlen, d]`` and keys/values ``[b, heads/tp, klen, d]``;
    ``mask`` as SDPA's (bool = may attend, float = added to the scores), ``causal`` when
    query ``i`` sees keys ``<= i`` and there is no mask; ``z`` what :meth:`inputs` gave.

    ``attr`` is where :class:`SelfAttention` holds the core (its state-dict name)."""

    attr = "core"

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, device=None):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.dropout_p, self.rng, self.tp_size = cfg.attention_dropout, ctx.rng, ctx.tp_size

    def inputs(self) -> torch.Tensor | None:
        """A tensor computed from the core's parameters before the sublayer runs, passed
        back to :meth:`forward` (so a checkpointed sublayer takes it as an input)."""
        return None

    def memory_needed(self, mlen: int) -> int:
        """How many of ``mlen`` remembered positions this core can still attend to."""
        return mlen


@ATTENTION_CORES.register("math")
class MathCore(AttentionCore):
    """The core written out; the probabilities dropped with :meth:`TPRNGTracker.dropout`
    (traceable, this TP rank's stream)."""

    def forward(self, q, k, v, mask, causal, z=None):
        return self.math(q, k, v, mask, causal, self.dropout_p if self.training else 0.0)

    def math(self, q, k, v, mask, causal, p: float) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_dim ** 0.5
        if causal and mask is None:  # [qlen, klen]
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # [b, heads/tp, qlen, klen]
        return torch.matmul(self.rng.dropout(probs, p), v)  # [b, heads/tp, qlen, d]


@ATTENTION_CORES.register("sdpa")
class SDPACore(MathCore):
    """``F.scaled_dot_product_attention`` (flash or memory-efficient kernels where the
    device has them), dropout drawn from this TP rank's RNG stream."""

    def forward(self, q, k, v, mask, causal, z=None):
        p = self.dropout_p if self.training else 0.0
        if p and torch.compiler.is_compiling() and self.tp_size > 1:
            # NOTE: compiled, SDPA's dropout would come from the default generator, the
            # same on every TP rank; this rank's heads take their mask from its own stream
            return self.math(q, k, v, mask, causal, p)
        # TP=1: one rank's heads are all the heads, the default stream serves (and a
        # compiled step then draws the masks of an eager one)
        fork = self.rng.fork() if p and self.tp_size > 1 else contextlib.nullcontext()
        with fork:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, dropout_p=p)


class AttentionTap(nn.Module):
    """The identity on what the core is given, ``(q, k, v, mask, causal)``: a place for
    forward hooks to see it (:func:`captured`), once per forward, outside any
    recomputation of the core."""

    def forward(self, q, k, v, mask, causal):
        return q, k, v, mask, causal


@contextlib.contextmanager
def captured(layers: list[SelfAttention]) -> Iterator[list[list[tuple]]]:
    """Inside the block, record what each attention layer's core is given: one list per
    layer, one ``(q, k, v, mask, causal)`` per forward (distillation's relations)."""
    seen: list[list[tuple]] = [[] for _ in layers]
    handles = [layer.tap.register_forward_hook(lambda m, args, out, store=store: store.append(out))
               for layer, store in zip(layers, seen, strict=True)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class SelfAttention(nn.Module):
    """Multi-head self-attention with heads split across the TP group.

    Grouped-query attention (Ainslie et al. 2023; ``model.num_query_groups`` g below the
    head count n): separate ``q`` (n heads), ``k`` and ``v`` (g heads each) projections;
    query head i reads K/V head ``i // (n / g)``. When TP divides g, ``k``/``v`` are
    column-parallel like ``q`` (a rank's query heads are exactly those of its groups);
    when g divides TP, each K/V head is computed by the ``TP / g`` ranks that share it
    (:class:`~megatron_lite.parallel.SharedColumnLinear`: replicated weights, gradients
    summed over TP). The KV cache holds the g heads once; they are repeated for the
    query heads after it."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, causal: bool, device=None):
        super().__init__()
        h, std = cfg.hidden_size, cfg.init_std
        self.head_dim, self.causal = h // cfg.num_attention_heads, causal
        self.selective = cfg.activation_checkpointing == "selective"
        bias, group = cfg.add_bias_linear, ctx.tp_group
        sp = ctx.sequence_parallel  # x arrives as a sequence shard while it is active
        groups = cfg.query_groups
        self.grouped = groups != cfg.num_attention_heads
        if not self.grouped:
            self.qkv = ColumnParallelLinear(h, 3 * h, stride=3, init_method=normal_init(std),
                                            bias=bias, tp_group=group, sequence_parallel=sp,
                                            device=device)
        else:
            kv = groups * self.head_dim
            self.q = ColumnParallelLinear(h, h, init_method=normal_init(std), bias=bias,
                                          tp_group=group, sequence_parallel=sp, device=device)
            for name in ("k", "v"):
                if groups % ctx.tp_size == 0:
                    layer = ColumnParallelLinear(h, kv, init_method=normal_init(std),
                                                 bias=bias, tp_group=group,
                                                 sequence_parallel=sp, device=device)
                else:  # (sequence parallelism with shared K/V heads is refused by config)
                    layer = SharedColumnLinear(h, kv, groups, init_method=normal_init(std),
                                               bias=bias, tp_group=group, device=device)
                self.add_module(name, layer)
        self.proj = RowParallelLinear(
            h, h, input_is_parallel=True, tp_group=group, device=device, bias=bias,
            init_method=normal_init(cfg.residual_output_std), sequence_parallel=sp)
        self.positions = position_scheme(cfg)
        self.positions.attention_modules(self, ctx, device)
        core = ATTENTION_CORES.of(cfg)
        self.core_attr = core.attr
        self.add_module(core.attr, core(cfg, ctx, device))
        self.tap = AttentionTap()  # what the core is given, for hooks (:func:`captured`)

    @property
    def attention_core(self) -> AttentionCore:
        return getattr(self, self.core_attr)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, index: int = 0, z: torch.Tensor | None = None,
                *pos) -> torch.Tensor:
        """Attention of ``x`` ``[b, s, h]`` (normalized): ``[b, qlen, h]``. ``pos`` are the
        position scheme's inputs (:meth:`PositionScheme.attention_input`); ``z`` the core's
        (:meth:`AttentionCore.inputs`)."""
        core = self.attention_core
        if not self.grouped:
            qkv = self.qkv(x)  # [b, s, 3 * h/tp] (sequence parallelism: all of it gathered)
            b, s, _ = qkv.shape
            qkv = qkv.view(b, s, 3, -1, self.head_dim)  # [b, s, 3, heads/tp, d]
            q, k, values = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads/tp, s, d]
        else:  # q [b, heads/tp, s, d]; k, values [b, kv heads here, s, d]
            q, k, values = (layer(x) for layer in (self.q, self.k, self.v))
            b, s, _ = q.shape  # (sequence parallelism: all of it gathered)
            q, k, values = (t.view(b, s, -1, self.head_dim).transpose(1, 2)
                            for t in (q, k, values))
        q, k, values, mask, causal = self.positions.attend(self, q, k, values, mask, cache,
                                                           index, *pos)
        if k.shape[1] != q.shape[1]:  # grouped: each K/V head serves heads/groups queries
            # NOTE: only this rank's query heads: all of one shared group, or whole groups
            k, values = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)
                         for t in (k, values))
        if z is None:
            z = core.inputs()
        q, k, values, mask, causal = self.tap(q, k, values, mask, causal)
        if self.selective and self.training and torch.is_grad_enabled():
            heads = checkpoint(core, core.rng, q, k, values, mask, causal, z)
        else:
            heads = core(q, k, values, mask, causal, z)  # [b, heads/tp, qlen, d]
        # [b, qlen, h] (sequence parallelism: this rank's [b, qlen/tp, h])
        return self.proj(heads.transpose(1, 2).reshape(b, q.shape[2], -1))
