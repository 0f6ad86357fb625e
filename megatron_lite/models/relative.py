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

from megatron_lite.config import ConfigError
from megatron_lite.hooks import TrainingHook
from megatron_lite.parallel import ParallelContext
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
