"""MLP parts (``model.activation``): the feed-forward sublayer's body."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.registry import MLPS, Part
from megatron_lite.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    normal_init,
    scaled_normal_init,
)


def activation_fn(name: str):
    """``gelu_tanh`` (GPT-2's "gelu_new", Megatron's default) or exact ``gelu`` (BERT)."""
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"model.activation={name!r} is not one of gelu_tanh, gelu")


@MLPS.register("gelu_tanh", "gelu")
class MLP(nn.Module, Part):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel): one all-reduce forward
    (sequence parallelism: an all-gather in, a reduce-scatter out)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, device=None):
        super().__init__()
        h, std = cfg.hidden_size, cfg.init_std
        self.act = activation_fn(cfg.activation)
        sp = ctx.sequence_parallel
        self.fc1 = ColumnParallelLinear(h, cfg.ffn_size, init_method=normal_init(std),
                                        tp_group=ctx.tp_group, sequence_parallel=sp,
                                        device=device)
        self.fc2 = RowParallelLinear(
            cfg.ffn_size, h, input_is_parallel=True, tp_group=ctx.tp_group, device=device,
            init_method=scaled_normal_init(std, len(cfg.pattern) / 2), sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [b, s, ffn/tp] inside, [b, s, h] out


def mlp(cfg: ModelConfig, ctx: ParallelContext, device=None) -> nn.Module:
    """The MLP ``cfg`` chooses."""
    return MLPS.of(cfg)(cfg, ctx, device)
