"""MLP parts (``model.activation``): the feed-forward sublayer's body: GELU (GPT-2, BERT)
or SwiGLU (Shazeer 2020; Llama)."""

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
        bias, sp = cfg.add_bias_linear, ctx.sequence_parallel
        self.fc1 = ColumnParallelLinear(h, cfg.ffn_size, init_method=normal_init(std),
                                        bias=bias, tp_group=ctx.tp_group, sequence_parallel=sp,
                                        device=device)
        self.fc2 = RowParallelLinear(
            cfg.ffn_size, h, input_is_parallel=True, tp_group=ctx.tp_group, device=device,
            bias=bias, init_method=normal_init(cfg.residual_output_std),
            sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [b, s, ffn/tp] inside, [b, s, h] out

    @classmethod
    def flops(cls, cfg: ModelConfig) -> float:
        """Forward FLOPs per token: two ``h x ffn`` matmuls."""
        return 4 * cfg.hidden_size * cfg.ffn_size


@MLPS.register("swiglu")
class SwiGLU(nn.Module, Part):
    """``down(silu(gate(x)) * up(x))``: gate and up fused into one column-parallel
    ``fc1`` of ``2 x ffn`` rows ``[gate|up]`` with stride 2, so each TP rank holds the
    matching slices of both (its ``[gate_r|up_r]``); ``fc2`` (down) row-parallel. One
    all-reduce forward, as the GELU MLP."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, device=None):
        super().__init__()
        h, ffn, std, bias = cfg.hidden_size, cfg.ffn_size, cfg.init_std, cfg.add_bias_linear
        sp = ctx.sequence_parallel
        self.fc1 = ColumnParallelLinear(h, 2 * ffn, stride=2, init_method=normal_init(std),
                                        bias=bias, tp_group=ctx.tp_group, sequence_parallel=sp,
                                        device=device)
        self.fc2 = RowParallelLinear(
            ffn, h, input_is_parallel=True, tp_group=ctx.tp_group, device=device, bias=bias,
            init_method=normal_init(cfg.residual_output_std), sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)  # each [b, s, ffn/tp]
        return self.fc2(F.silu(gate) * up)  # [b, s, h]

    @classmethod
    def flops(cls, cfg: ModelConfig) -> float:
        """Forward FLOPs per token: three ``h x ffn`` matmuls."""
        return 6 * cfg.hidden_size * cfg.ffn_size


def mlp(cfg: ModelConfig, ctx: ParallelContext, device=None) -> nn.Module:
    """The MLP ``cfg`` chooses."""
    return MLPS.of(cfg)(cfg, ctx, device)
