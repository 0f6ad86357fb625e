"""PAR's differentiable search (Mandava et al. 2020): a supernet of mixed blocks.

Block ``b`` outputs ``sum_k w_k op_k(x)`` over the branches ``op`` in {self-attention
``s``, feed-forward ``f``, identity ``i``} (each ``s``/``f`` branch a whole residual
sublayer of ours: its LayerNorm, residual and dropout), with
``w = GumbelSoftmax(alpha_b, tau)``. The architecture parameters ``alpha`` ``[blocks,
branches]`` are replicated on every rank (the TP group draws the same Gumbel noise:
from a generator seeded by (seed, step, micro-batch, DP rank), never the global RNG) and
averaged over DP like any replicated parameter. A step costs about the sum of its
branches: every block runs both its attention and its feed-forward sublayer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.norms import norm
from megatron_lite.models.positions import position_scheme
from megatron_lite.models.transformer import Sublayer
from megatron_lite.parallel import (
    ParallelContext,
    mark_sequence_parallel,
    mark_sequence_parallel_module,
)

BRANCHES = "sfi"  # self-attention, feed-forward, identity


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                   hard: bool = False) -> torch.Tensor:
    """Softmax((logits + Gumbel noise) / tau) over the last dim. ``hard``: the one-hot of
    the argmax forward, the soft weights' gradient backward (straight-through)."""
    u = torch.rand(logits.shape, generator=generator).to(logits.device)
    noise = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = F.softmax((logits + noise) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return one_hot + soft - soft.detach()


class SuperTransformer(nn.Module):
    """``blocks`` mixed blocks (and the final LayerNorm), a drop-in for
    :class:`~megatron_lite.models.transformer.Transformer` in a GPT model.

    Args:
        cfg: the model config (sizes, positions; its sublayer pattern is ignored).
        ctx: the parallel context.
        blocks: the number of mixed blocks.
        branches: which of ``s``, ``f``, ``i`` each block mixes.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, blocks: int,
                 branches: str = BRANCHES, device=None):
        super().__init__()
        self.branches, self.rng = branches, ctx.rng
        self.dp_rank = ctx.dp_rank
        # init scaled as a model of `blocks` sublayers (blocks / 2 layers)
        sized = dataclasses.replace(cfg, num_layers=blocks // 2 or 1, sublayer_pattern="",
                                    layerdrop=0.0, layers_to_keep="", sandwich_coefficient=0,
                                    par_ratio=0.0)
        self.attn = nn.ModuleList(Sublayer("s", sized, ctx, True, device) if "s" in branches
                                  else nn.Identity() for _ in range(blocks))
        self.ffn = nn.ModuleList(Sublayer("f", sized, ctx, True, device) if "f" in branches
                                 else nn.Identity() for _ in range(blocks))
        self.alpha = nn.Parameter(torch.zeros(blocks, len(branches), device=device))
        # sequence parallelism: alpha weighs this rank's tokens only, the final norm runs
        # on them: their gradients are summed over TP
        mark_sequence_parallel(self.alpha, ctx.sequence_parallel, ctx.tp_group)
        self.final_ln = mark_sequence_parallel_module(norm(cfg, device), ctx.sequence_parallel,
                                                      ctx.tp_group)
        self.positions = position_scheme(cfg)
        shared = self.positions.stack_module(ctx, device)  # e.g. Transformer-XL's u, v
        if shared is not None:
            self.add_module(self.positions.stack_attr, shared)
        self.tau, self.hard, self.seed = 1.0, False, 0
        self.key: tuple[int, ...] | None = None  # (step, micro-batch), set before a forward

    def weights(self) -> torch.Tensor:
        """``[blocks, branches]``: Gumbel-softmax weights in training, softmax(alpha) in
        evaluation (the expected supernet, no noise)."""
        if not self.training:
            return F.softmax(self.alpha, dim=-1)
        seed = np.random.SeedSequence([self.seed, *(self.key or (0, 0)), self.dp_rank])
        gen = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
        return gumbel_softmax(self.alpha, self.tau, gen, self.hard)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None,
                memory=None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("the search supernet has no KV cache (generate with found.yaml)")
        w = self.weights()
        segment = self.positions.segment(self, memory)
        for b, (attn, ffn) in enumerate(zip(self.attn, self.ffn, strict=True)):
            out = 0.0
            for k, branch in enumerate(self.branches):
                if branch == "s":
                    pos = segment.inputs(b, attn, x)
                    out = out + w[b, k] * attn(x, mask, None, b, None, *pos)
                elif branch == "f":
                    out = out + w[b, k] * ffn(x)
                else:
                    out = out + w[b, k] * x
            x = out  # [b, s, h]
        segment.close()
        return self.final_ln(x)

    def pattern(self) -> str:
        """The argmax branch of every block, identity blocks left out."""
        best = self.alpha.detach().argmax(-1).tolist()
        return "".join(self.branches[k] for k in best if self.branches[k] != "i")
