"""The transformer stack shared by GPT and BERT, written with the tensor-parallel layers.

The stack is a list of residual *sublayers* read from a pattern, bottom to top:
``s`` = self-attention, ``f`` = feed-forward. ``"sf" * N`` is an ordinary N-layer
transformer; other orders (sandwich, PAR) are just other strings. Each sublayer is
self-contained: its own LayerNorm, residual and dropout.

Tensor parallelism (Megatron 2019): attention is split by heads (fused QKV is
column-parallel with stride 3, the output projection row-parallel); the MLP is
column-parallel then row-parallel. One all-reduce per sublayer forward, one backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.adaptive_span import AdaptiveSpan
from megatron_lite.models.layerdrop import LayerDrop, zero_touch
from megatron_lite.models.relative import (
    Memory,
    RelativeBiases,
    relative_encoding,
    shift_index,
)
from megatron_lite.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    VocabParallelEmbedding,
    checkpoint,
    normal_init,
    pad_vocab_size,
    scaled_normal_init,
)


def activation_fn(name: str):
    """``gelu_tanh`` (GPT-2's "gelu_new", Megatron's default) or exact ``gelu`` (BERT)."""
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"model.activation={name!r} is not one of gelu_tanh, gelu")


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


class SelfAttention(nn.Module):
    """Multi-head self-attention with heads split across the TP group."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, causal: bool, device=None):
        super().__init__()
        h, std = cfg.hidden_size, cfg.init_std
        self.head_dim = h // cfg.num_attention_heads
        self.causal, self.dropout_p, self.rng = causal, cfg.attention_dropout, ctx.rng
        self.tp_size = ctx.tp_size
        self.selective = cfg.activation_checkpointing == "selective"
        self.qkv = ColumnParallelLinear(h, 3 * h, stride=3, init_method=normal_init(std),
                                        tp_group=ctx.tp_group, device=device)
        self.proj = RowParallelLinear(
            h, h, input_is_parallel=True, tp_group=ctx.tp_group, device=device,
            init_method=scaled_normal_init(std, len(cfg.pattern) / 2))
        # Transformer-XL: W_R projects the distance encodings, split by heads like Q
        self.r_proj = ColumnParallelLinear(h, h, bias=False, init_method=normal_init(std),
                                           tp_group=ctx.tp_group, device=device) \
            if cfg.position_embedding == "relative" else None
        self.hidden, self.clamp_len = h, cfg.clamp_len
        self.adaptive = AdaptiveSpan(cfg, ctx, device) if cfg.adaptive_span else None
        # distillation (megatron_lite/distill.py): a list that each forward appends its
        # (q, k, v, mask, causal) to; None: nothing kept
        self.capture: list | None = None

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None, causal: bool,
             z: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v, with dropout drawn from this TP rank's RNG stream."""
        if z is not None:  # adaptive spans: the span mask acts after the softmax
            return self.adaptive_core(q, k, v, mask, z)
        p = self.dropout_p if self.training else 0.0
        compiling = torch.compiler.is_compiling()
        if p and compiling and self.tp_size > 1:
            # NOTE: compiled, SDPA's dropout would come from the default generator, the
            # same on every TP rank; this rank's heads take their mask from its own stream
            return self.math_core(q, k, v, mask, causal, p)
        # TP=1: one rank's heads are all the heads, the default stream serves (and a
        # compiled step then draws the masks of an eager one)
        fork = self.rng.fork() if p and self.tp_size > 1 else contextlib.nullcontext()
        with fork:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, dropout_p=p)

    def math_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None, causal: bool, p: float) -> torch.Tensor:
        """:meth:`core` written out (SDPA's masks: bool = may attend, float = added), the
        probabilities dropped with :meth:`TPRNGTracker.dropout` (traceable)."""
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_dim ** 0.5
        if causal and mask is None:  # [qlen, klen]
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # [b, heads/tp, qlen, klen]
        return torch.matmul(self.rng.dropout(probs, p), v)  # [b, heads/tp, qlen, d]

    def adaptive_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias), times the heads' span masks (spans ``z``),
        renormalised (as the author code: ``a * m / (sum(a * m) + 1e-8)``), dropout, times v."""
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_dim ** 0.5 + bias
        probs = torch.softmax(scores.float(), dim=-1)  # [b, heads/tp, qlen, klen]
        probs = probs * self.adaptive.mask(q.shape[2], k.shape[2], z, q.device)
        probs = (probs / (probs.sum(-1, keepdim=True) + 1e-8)).to(v.dtype)
        probs = self.rng.dropout(probs, self.dropout_p, self.training)
        return torch.matmul(probs, v)  # [b, heads/tp, qlen, d]

    def position_scores(self, q: torch.Tensor, v_bias: torch.Tensor, mlen: int) -> torch.Tensor:
        """``(q_i + v) . W_R R_{i-j} / sqrt(d)`` for queries ``[b, heads/tp, qlen, d]`` against
        ``mlen + qlen`` keys, ``-inf`` where key ``j`` is in the future of query ``i``."""
        b, heads, qlen, d = q.shape
        klen = mlen + qlen
        r = relative_encoding(qlen, mlen, self.hidden, self.clamp_len, q.device)  # [klen, h]
        r = self.r_proj(r.to(self.r_proj.weight.dtype)).view(klen, heads, d)  # [klen, H/tp, d]
        raw = torch.matmul(q + v_bias[None, :, None, :], r.permute(1, 2, 0))  # by distance
        scores = raw.gather(-1, shift_index(qlen, mlen, q.device).expand(b, heads, qlen, klen))
        allowed = torch.ones(qlen, klen, dtype=torch.bool, device=q.device).tril(mlen)
        return (scores / self.head_dim ** 0.5).masked_fill(~allowed, float("-inf"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, index: int = 0, qlen: int | None = None,
                u: torch.Tensor | None = None, v: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``x`` ``[b, s, h]`` (normalized). With relative positions ``x`` may be
        ``[memory, segment]``: the queries are its last ``qlen`` positions, and ``u``, ``v``
        are the shared ``[heads/tp, d]`` biases."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, -1, self.head_dim)  # [b, s, 3, heads/tp, d]
        q, k, values = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads/tp, s, d]
        causal = self.causal
        if self.r_proj is not None:  # Transformer-XL: (q + u) k_j + (q + v) W_R R_{i-j}
            qlen = qlen or s
            q = q[:, :, s - qlen:]  # [b, heads/tp, qlen, d]
            mask = self.position_scores(q, v, s - qlen)  # [b, heads/tp, qlen, s]
            q, causal, s = q + u[None, :, None, :], False, qlen
        elif cache is not None:
            past = cache.length
            k, values = cache.extend(index, k, values)  # [b, heads/tp, past + s, d]
            if causal and past:  # the queries are the last s positions: i sees past + i
                causal = False
                if s > 1:
                    mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)
        if self.capture is not None:
            self.capture.append((q, k, values, mask, causal))
        if self.selective and self.training and torch.is_grad_enabled():
            heads = checkpoint(self.core, self.rng, q, k, values, mask, causal, z)
        else:
            heads = self.core(q, k, values, mask, causal, z)  # [b, heads/tp, s, d]
        return self.proj(heads.transpose(1, 2).reshape(b, s, -1))  # [b, s, h]


class MLP(nn.Module):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, device=None):
        super().__init__()
        h, std = cfg.hidden_size, cfg.init_std
        self.act = activation_fn(cfg.activation)
        self.fc1 = ColumnParallelLinear(h, cfg.ffn_size, init_method=normal_init(std),
                                        tp_group=ctx.tp_group, device=device)
        self.fc2 = RowParallelLinear(
            cfg.ffn_size, h, input_is_parallel=True, tp_group=ctx.tp_group, device=device,
            init_method=scaled_normal_init(std, len(cfg.pattern) / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [b, s, ffn/tp] inside, [b, s, h] out


class Sublayer(nn.Module):
    """A residual sublayer: ``x + drop(F(LN(x)))`` (pre-LN) or ``LN(x + drop(F(x)))`` (post)."""

    def __init__(self, kind: str, cfg: ModelConfig, ctx: ParallelContext, causal: bool,
                 device=None):
        super().__init__()
        self.kind = kind
        self.post_ln = cfg.layernorm_order == "post"
        self.dropout_p = cfg.hidden_dropout
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=device)
        if kind == "s":
            self.attn = SelfAttention(cfg, ctx, causal, device)
        elif kind == "f":
            self.mlp = MLP(cfg, ctx, device)
        else:
            raise ValueError(f"unknown sublayer kind {kind!r} (expected 's' or 'f')")

    def body(self, x: torch.Tensor, mask: torch.Tensor | None, cache=None,
             index: int = 0) -> torch.Tensor:
        return self.attn(x, mask, cache, index) if self.kind == "s" else self.mlp(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, index: int = 0, u: torch.Tensor | None = None,
                v: torch.Tensor | None = None, mem: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """``u``, ``v``: the relative-position biases; ``mem``: this sublayer's memory
        ``[b, m, h]`` (its inputs of the previous segments), attended to with ``x``;
        ``z``: adaptive spans, computed by the caller (see :meth:`Transformer.forward`)."""
        if u is not None and self.kind == "s":  # relative positions (pre-LN, validated)
            if mem is not None and self.attn.adaptive is not None:  # drop what no span reaches
                mem = mem[:, mem.shape[1] - self.attn.adaptive.keep(mem.shape[1]):]
            src = x if mem is None else torch.cat([mem.to(x.dtype), x], dim=1)
            if z is None and self.attn.adaptive is not None:
                z = self.attn.adaptive.z()
            out = self.attn(self.ln(src), qlen=x.shape[1], u=u, v=v, z=z)  # [b, s, h]
            return x + F.dropout(out, self.dropout_p, self.training)
        if self.post_ln:
            return self.ln(x + F.dropout(self.body(x, mask, cache, index), self.dropout_p,
                                         self.training))
        return x + F.dropout(self.body(self.ln(x), mask, cache, index), self.dropout_p,
                             self.training)


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
        self.final_ln = (nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=device)
                         if cfg.layernorm_order == "pre" else None)
        self.layerdrop = LayerDrop(cfg, ctx.dp_rank)
        self.rel = RelativeBiases(cfg.num_attention_heads,
                                  cfg.hidden_size // cfg.num_attention_heads,
                                  cfg.init_std, ctx, device) \
            if cfg.position_embedding == "relative" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, memory: Memory | None = None) -> torch.Tensor:
        """``cache`` (inference): attend to the cached positions too, and add this input's.
        ``memory`` (relative positions): attend to it too, and stage this segment's inputs."""
        grad = self.training and torch.is_grad_enabled()
        recompute = self.full_checkpoint and grad
        run = self.layerdrop.plan(len(self.layers), self.training)
        u, v = (self.rel.u, self.rel.v) if self.rel is not None else (None, None)
        skipped = None  # zero terms giving the skipped sublayers' parameters a gradient
        for i, layer in enumerate(self.layers):
            mem = None
            if memory is not None and layer.kind == "s":
                mem = memory.get(i)
                memory.stage(i, x)  # also when skipped: every memory covers the same past
            # NOTE: the spans enter checkpointed regions as an input, not read inside: a
            # parameter read inside a reentrant checkpoint and again outside (the Trainer's
            # span penalty) would get two gradient writes, which DDP and ZeRO refuse
            adaptive = getattr(getattr(layer, "attn", None), "adaptive", None)
            z = adaptive.z() if adaptive is not None else None
            if run is not None and not run[i]:
                if grad:
                    skipped = zero_touch(layer) + (0.0 if skipped is None else skipped)
            elif recompute:
                x = checkpoint(layer, self.rng, x, mask, None, i, u, v, mem, z)
            else:
                x = layer(x, mask, cache, i, u, v, mem, z)
        if memory is not None:
            memory.commit()
        if skipped is not None and self.rel is not None:  # u, v may have no other use
            skipped = skipped + zero_touch(self.rel)
        if skipped is not None:
            x = x + skipped.to(x.dtype)
        if cache is not None:
            cache.length += x.shape[1]
        return x if self.final_ln is None else self.final_ln(x)

    def training_hooks(self, cfg) -> list:
        """What training needs for this stack: its LayerDrop's hooks."""
        return self.layerdrop.training_hooks(cfg)


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
