"""Adaptive attention span (Sukhbaatar et al. 2019), on Transformer-XL's relative attention.

Each head ``h`` learns ``z_h = S * c_h`` (``c_h`` in [0, 1], ``S = model.attn_span``). The
attention weights of a query at distance ``x`` from a key are multiplied after the
softmax by the soft mask ``m(x) = clamp((R + z_h - x) / R, 0, 1)`` (``R`` the ramp) and
renormalised, as in the author code. The L1 penalty ``lambda * sum z`` is added to the
training loss by the Trainer and logged apart (``span_loss``).

The compute is really saved: before the attention of a sublayer, the memory positions
older than ``max_h z_h + R`` (the largest span of the layer, all-reduced with MAX over
the TP group so every rank keeps the same keys) are dropped in chunks of 64, before the
key/value projections. Those keys had mask 0, so the result is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import MAX, all_gather, all_reduce
from megatron_lite.parallel.layers import mark_tp
from megatron_lite.parallel.state import group_size
from megatron_lite.parallel.utils import divide

TRIM_CHUNK = 64


def span_mask(distance: torch.Tensor, z: torch.Tensor, ramp: int) -> torch.Tensor:
    """``clamp((R + z - x) / R, 0, 1)`` for distances ``x`` and spans ``z`` (broadcast)."""
    return ((ramp + z - distance) / ramp).clamp(0.0, 1.0)


class AdaptiveSpan(nn.Module):
    """The spans of one attention sublayer's heads (this TP rank's ``heads/tp``).

    Args:
        cfg: ``attn_span``, ``adaptive_span_ramp``, ``adaptive_span_init``.
        ctx: the parallel context (the heads are split over its TP group).
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, device=None):
        super().__init__()
        local = divide(cfg.num_attention_heads, group_size(ctx.tp_group),
                       "model.num_attention_heads")
        self.span, self.ramp, self.tp_group = cfg.attn_span, cfg.adaptive_span_ramp, ctx.tp_group
        # c_h = z_h / S, as the author code keeps it; the same start on every head
        self.fraction = nn.Parameter(torch.full((local,), cfg.adaptive_span_init,
                                                device=device))
        mark_tp(self.fraction, 0)

    def z(self) -> torch.Tensor:
        """``[heads/tp]`` spans in positions (the fraction clamped to [0, 1] here too, so a
        parameter the optimizer pushed out of range never acts out of range)."""
        return self.fraction.clamp(0.0, 1.0) * self.span

    def mask(self, qlen: int, klen: int, z: torch.Tensor | None = None,
             device=None) -> torch.Tensor:
        """``[heads/tp, qlen, klen]`` soft mask for spans ``z`` (default :meth:`z`); query
        ``i`` sits at ``klen - qlen + i``."""
        z = self.z() if z is None else z
        i = torch.arange(qlen, device=device)[:, None] + (klen - qlen)
        j = torch.arange(klen, device=device)[None, :]
        distance = (i - j).float()  # negative (future) keys are masked causally elsewhere
        return span_mask(distance[None], z[:, None, None], self.ramp)

    @torch.no_grad()
    def keep(self, mlen: int) -> int:
        """How many of the ``mlen`` memory positions the layer still needs: those within
        the layer's largest span (+ ramp) of the first query, trimmed in chunks of 64."""
        largest = all_reduce(self.z().max().detach().clone(), self.tp_group, MAX)
        reach = math.ceil(float(largest)) + self.ramp  # keys farther than this have mask 0
        trim = max(0, mlen - reach) // TRIM_CHUNK * TRIM_CHUNK
        return mlen - trim

    def penalty(self) -> torch.Tensor:
        """This rank's part of ``sum z`` (its heads)."""
        return self.z().sum()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.fraction.clamp_(0.0, 1.0)

    @torch.no_grad()
    def all_spans(self) -> torch.Tensor:
        """Every head's span (collective over TP)."""
        return all_gather(self.z().detach(), self.tp_group, dim=0)


def span_modules(model: nn.Module) -> list[AdaptiveSpan]:
    """The model's adaptive-span modules, bottom to top."""
    return [m for m in model.modules() if isinstance(m, AdaptiveSpan)]
