"""Transformer-XL (Dai et al. 2019): relative positional attention and segment memory.

Relative attention scores query ``i`` against key ``j`` as

    (q_i + u) . k_j  +  (q_i + v) . W_R R_{i-j}

with ``R_d`` the sinusoid encoding of the distance ``d`` (capped at ``model.clamp_len``),
``W_R`` a learned projection per attention sublayer, and ``u``, ``v`` learned per-head
biases shared by every layer (the author code's default). There is no absolute position
embedding. Under tensor parallelism ``u``, ``v`` and ``W_R`` are split by heads like the
queries they serve (``W_R`` is column-parallel on a replicated input), so a sublayer
still costs one all-reduce forward and one backward.

The memory (``model.mem_len = M``): every attention sublayer keeps the last ``M`` inputs
of the previous segments, detached, and its keys and values cover ``[memory, segment]``;
query ``i`` of the segment sits at position ``mlen + i`` and sees keys ``j <= mlen + i``.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import Config, ConfigError, ModelConfig
from megatron_lite.hooks import TrainingHook
from megatron_lite.models.positions import PositionScheme, Segment
from megatron_lite.models.registry import POSITIONS
from megatron_lite.parallel import ColumnParallelLinear, ParallelContext
from megatron_lite.parallel.layers import init_shard_, mark_tp, normal_init
from megatron_lite.parallel.state import group_size
from megatron_lite.parallel.utils import divide


def sinusoid(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """``[n, dim]``: ``[sin(d w), cos(d w)]`` with ``w_k = 10000^(-2k/dim)`` (Vaswani et al.)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2.0, device=distances.device) / dim))
    angles = distances.float()[:, None] * inv_freq[None]  # [n, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def relative_encoding(qlen: int, mlen: int, dim: int, clamp_len: int,
                      device=None) -> torch.Tensor:
    """``[klen, dim]`` encodings of the distances ``klen-1 ... 0`` (``klen = mlen + qlen``),
    each capped at ``clamp_len`` when it is > 0."""
    distances = torch.arange(qlen + mlen - 1, -1, -1, device=device)
    if clamp_len > 0:
        distances = distances.clamp(max=clamp_len)
    return sinusoid(distances, dim)


def shift_index(qlen: int, mlen: int, device=None) -> torch.Tensor:
    """``[qlen, klen]``: for query ``i`` and key ``j``, the column of the ``[qlen, klen]``
    position scores (columns = distances ``klen-1 ... 0``) holding distance ``mlen + i - j``.
    Keys in the future of the query (masked anyway) point at column 0.

    NOTE: the author code gets the same with its "relative shift" (pad a zero column,
    reshape, drop a row); a gather says what it does and leaves no garbage behind.
    """
    klen = qlen + mlen
    i = torch.arange(qlen, device=device)[:, None]
    j = torch.arange(klen, device=device)[None, :]
    return (j + qlen - 1 - i).clamp(0, klen - 1)


class RelativeBiases(nn.Module):
    """The content bias ``u`` and position bias ``v``, ``[heads/tp, head_dim]`` each, shared
    by every attention sublayer and split by heads over TP (drawn whole, then sliced)."""

    def __init__(self, heads: int, head_dim: int, std: float, ctx: ParallelContext,
                 device=None):
        super().__init__()
        local = divide(heads, group_size(ctx.tp_group), "model.num_attention_heads")
        for name in ("u", "v"):
            p = nn.Parameter(torch.empty(local, head_dim, device=device))
            init_shard_(p, (heads, head_dim), normal_init(std), 0, 1, ctx.tp_group)
            mark_tp(p, 0)
            setattr(self, name, p)

    def training_hooks(self, cfg) -> list[TrainingHook]:
        """With a memory (``model.mem_len > 0``): :class:`MemoryHook`."""
        return [MemoryHook(cfg)] if cfg.model.mem_len > 0 else []


class Memory:
    """The memory of a run of segments: per attention sublayer, its last ``mem_len``
    inputs ``[b, <= mem_len, h]``, detached (no gradient flows into the past).

    One per batch row set (training keeps one per micro-batch: :class:`MemoryHook`); the
    model reads the old memory in forward and stages the new one, :meth:`commit` makes it
    current. Also the natural cache for generation.
    """

    def __init__(self, mem_len: int):
        self.mem_len = mem_len
        self.layers: dict[int, torch.Tensor] = {}
        self._staged: dict[int, torch.Tensor] = {}

    def get(self, index: int) -> torch.Tensor | None:
        return self.layers.get(index)

    @property
    def length(self) -> int:
        """Positions held (the same in every sublayer)."""
        return next(iter(self.layers.values())).shape[1] if self.layers else 0

    @torch.no_grad()
    def stage(self, index: int, x: torch.Tensor) -> None:
        """Record sublayer ``index``'s input ``x`` ``[b, s, h]`` for the next segment."""
        if self.mem_len <= 0:
            return
        old = self.layers.get(index)
        full = x if old is None else torch.cat([old.to(x.dtype), x], dim=1)
        self._staged[index] = full[:, -self.mem_len:].detach().clone()

    def commit(self) -> None:
        self.layers.update(self._staged)
        self._staged = {}

    def reset(self) -> None:
        self.layers, self._staged = {}, {}

    def state_dict(self) -> dict:
        return {"mem_len": self.mem_len, "layers": {k: v.cpu() for k, v in self.layers.items()}}

    def load_state_dict(self, state: dict, device=None) -> None:
        self.mem_len = state["mem_len"]
        self.layers = {int(k): v.to(device) for k, v in state["layers"].items()}
        self._staged = {}


class _MemorySegment(Segment):
    """One forward of a relative-position stack: each attention sublayer gets ``u``, ``v``
    and its memory, and its input is staged as the next segment's memory (also when
    LayerDrop skips it: every memory covers the same past)."""

    def __init__(self, rel: RelativeBiases, memory: Memory | None):
        self.rel, self.memory = rel, memory

    def inputs(self, index, layer, x):
        if getattr(layer, "kind", "s") != "s":
            return ()
        mem = None
        if self.memory is not None:
            mem = self.memory.get(index)
            self.memory.stage(index, x)
        return self.rel.u, self.rel.v, mem

    def close(self):
        if self.memory is not None:
            self.memory.commit()


@POSITIONS.register("relative")
class RelativePositions(PositionScheme):
    """Transformer-XL's relative positions and segment memory (see the module docstring)."""

    carries_memory = True
    requires = {"mem_len": "absolute positions cannot be continued across segments",
                "clamp_len": "it caps relative distances"}

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        m, problems = cfg.model, []
        if m.arch != "gpt":
            problems.append("model.position_embedding=relative is for GPT only (model.arch=gpt)")
        if m.layernorm_order != "pre":
            problems.append("model.position_embedding=relative is built pre-LN "
                            "(model.layernorm_order=pre)")
        if m.mem_len < 0 or m.clamp_len < 0:
            problems.append("model.mem_len and model.clamp_len must be >= 0")
        return problems

    @classmethod
    def describe(cls, m: ModelConfig) -> str:
        memory = f"a memory of model.mem_len={m.mem_len} past positions per attention " \
            "sublayer" if m.mem_len else "no memory (model.mem_len=0)"
        clamp = f", distances capped at model.clamp_len={m.clamp_len}" if m.clamp_len else ""
        return (f"Transformer-XL (Dai et al. 2019): relative positions, {memory}{clamp}")

    @classmethod
    def pipeline_refusal(cls, cfg: Config) -> str | None:
        return ("Transformer-XL's memory and its u, v are shared by every layer of the "
                "stack, across the stages")

    def embed(self, table, x, cache=None, memory=None):
        if cache is not None:
            raise ValueError("model.position_embedding=relative caches with a Memory "
                             "(memory=...), not a KVCache")
        return x

    def attention_flops(self, seq: int) -> float:
        """Per token of the segment (adaptive span's trimming not counted): the
        projections, the memory's Q/K/V too, W_R over every distance, then the content
        scores, position scores and context."""
        h, mem = self.cfg.hidden_size, self.cfg.mem_len
        klen = seq + mem
        return 8 * h * h + 6 * h * h * mem / seq + 2 * h * h * klen / seq + 6 * klen * h

    def stack_module(self, ctx, device=None):
        m = self.cfg
        return RelativeBiases(m.num_attention_heads, m.hidden_size // m.num_attention_heads,
                              m.init_std, ctx, device)

    def segment(self, stack, memory=None):
        return _MemorySegment(getattr(stack, self.stack_attr), memory)

    def new_memory(self) -> Memory:
        return Memory(self.cfg.mem_len)

    def decoding_memory(self, window: int) -> Memory:
        return Memory(self.cfg.mem_len or window)

    def attention_modules(self, attn, ctx, device=None):
        # W_R projects the distance encodings, split by heads like Q
        attn.r_proj = ColumnParallelLinear(self.cfg.hidden_size, self.cfg.hidden_size,
                                           bias=False, init_method=normal_init(self.cfg.init_std),
                                           tp_group=ctx.tp_group, device=device)

    def attention_input(self, x, attn, pos):
        """``[memory, x]`` (the memory trimmed to what the core still reaches) and
        ``(u, v, qlen)``."""
        u, v, mem = pos
        if mem is not None:
            mem = mem[:, mem.shape[1] - attn.attention_core.memory_needed(mem.shape[1]):]
        src = x if mem is None else torch.cat([mem.to(x.dtype), x], dim=1)
        return src, (u, v, x.shape[1])

    def attend(self, attn, q, k, v, mask, cache, index, *pos):
        """``(q_i + u) k_j + (q_i + v) W_R R_{i-j}``: the queries are the last ``qlen`` of
        the ``[memory, segment]`` positions; the position scores (``-inf`` in the future)
        go to the core as an additive mask."""
        u, bias_v, qlen = pos
        s = q.shape[2]
        q = q[:, :, s - qlen:]  # [b, heads/tp, qlen, d]
        scores = position_scores(attn, q, bias_v, s - qlen, self.cfg.clamp_len)
        return q + u[None, :, None, :], k, v, scores, False


def position_scores(attn, q: torch.Tensor, v_bias: torch.Tensor, mlen: int,
                    clamp_len: int) -> torch.Tensor:
    """``(q_i + v) . W_R R_{i-j} / sqrt(d)`` for queries ``[b, heads/tp, qlen, d]`` against
    ``mlen + qlen`` keys, ``-inf`` where key ``j`` is in the future of query ``i``."""
    b, heads, qlen, d = q.shape
    klen = mlen + qlen
    r = relative_encoding(qlen, mlen, attn.r_proj.in_features, clamp_len, q.device)  # [klen, h]
    r = attn.r_proj(r.to(attn.r_proj.weight.dtype)).view(klen, heads, d)  # [klen, H/tp, d]
    raw = torch.matmul(q + v_bias[None, :, None, :], r.permute(1, 2, 0))  # by distance
    scores = raw.gather(-1, shift_index(qlen, mlen, q.device).expand(b, heads, qlen, klen))
    allowed = torch.ones(qlen, klen, dtype=torch.bool, device=q.device).tril(mlen)
    return (scores / d ** 0.5).masked_fill(~allowed, float("-inf"))


class MemoryHook(TrainingHook):
    """Transformer-XL in training: one :class:`Memory` per micro-batch of the step (its rows
    are the same lanes every step, ``data.ordering=consecutive``), given to the model's
    forward as ``memory``. Emptied when the lanes start over and after a divergence
    recovery; saved with each rank's checkpoint state, so a resume continues it."""

    def __init__(self, cfg):
        m = cfg.model
        if cfg.data.ordering != "consecutive":
            what = "model.adaptive_span (its memory of model.attn_span positions)" \
                if m.adaptive_span else f"model.mem_len={m.mem_len}"
            raise ConfigError(f"{what} needs data.ordering=consecutive in training: with "
                              "shuffled samples the memory holds unrelated text, and the model "
                              "learns to ignore it")
        self.mem_len = m.mem_len
        self.memories: list[Memory] = []

    def setup(self, trainer) -> None:
        self.memories = [Memory(self.mem_len) for _ in range(trainer.accum)]

    def micro_batch(self, trainer, batch: dict, k: int) -> dict:
        if k == 0 and trainer.train_data.position(trainer.consumed)[1] == 0:
            self.on_recover(trainer)  # the lanes start over: nothing to remember
        batch["memory"] = self.memories[k]
        return batch

    def state_dict(self) -> dict:
        return {"memory": [m.state_dict() for m in self.memories]}

    def load_state_dict(self, state: dict, device) -> None:
        saved = state.get("memory")
        if saved is not None and len(saved) == len(self.memories):  # else: start empty
            for memory, one in zip(self.memories, saved, strict=True):
                memory.load_state_dict(one, device)

    def on_recover(self, trainer) -> None:
        for memory in self.memories:
            memory.reset()
