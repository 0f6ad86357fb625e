"""Differentiable collectives at the edges of a tensor-parallel region.

Each is a small autograd function whose forward and backward are conjugate:

====================  ==========================  ==========================
function              forward                     backward
====================  ==========================  ==========================
copy_to_tp_region     identity                    all-reduce (sum)
reduce_from_tp_region all-reduce (sum)            identity
scatter_to_tp_region  keep own slice of last dim  all-gather along last dim
gather_from_tp_region all-gather along last dim   keep own slice of last dim
====================  ==========================  ==========================

``copy_to`` / ``reduce_from`` are Megatron's *f* / *g*: a column-parallel linear is
entered through ``copy_to`` and a row-parallel linear left through ``reduce_from``, so a
transformer layer costs two all-reduces forward and two backward.

The group may be ``None`` (TP size one); then every function is the identity and no
communication happens.

In place, as Megatron: the two all-reduces overwrite the tensor they reduce instead of a
copy. Why that is safe here:

- ``reduce_from`` forward reduces its input and returns it, marked dirty (``mark_dirty``),
  so autograd knows it changed. Its inputs are the outputs of ``F.linear`` (the
  row-parallel matmul), a ``masked_fill`` (the vocab-parallel embedding) or a ``sum``
  (distillation losses): none of these saves its own output for backward. Were a future
  caller to pass a tensor some op saved, autograd's version counter turns it into an
  error at backward ("modified by an inplace operation"), never a silent wrong gradient.
- ``copy_to`` backward reduces the incoming gradient: the gradient of the one
  ``F.linear`` that consumes ``copy_to``'s output (column-parallel input, the output
  logits), a fresh tensor nobody else holds. (Reducing in place a gradient that
  autograd also routes elsewhere, such as the gradient of a sum's two inputs, would be
  wrong; no such consumer follows ``copy_to``.)

(``bench/tp_collectives.py`` measures this against reducing copies.)

Under ``torch.compile`` (``train.compile``) the all-reduces are traced as functional
collectives (``torch.distributed._functional_collectives``): they return a new tensor,
nothing is marked dirty, and inductor plans the buffers itself.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from megatron_lite.parallel.comm import all_gather, all_reduce
from megatron_lite.parallel.state import group_rank, group_size


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group``: in place when ``x`` is contiguous (see above)."""
    if group_size(group) == 1:
        return x
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", group)
    return all_reduce(x.contiguous(), group)


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by TP size {n}")
    return x.chunk(n, dim=-1)[group_rank(group)].contiguous()


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if x.is_contiguous() and group_size(group) > 1 and not torch.compiler.is_compiling():
            ctx.mark_dirty(x)
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group), None


class _GatherFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce the gradient over ``group``.

    Used where a replicated activation enters a TP region: every rank's partial
    gradient w.r.t. the shared input must be summed.
    """
    return x if group is None else _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity.

    Used where partial sums leave a TP region (after a row-parallel matmul).
    """
    return x if group is None else _ReduceFromTPRegion.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the last dim."""
    return x if group is None else _ScatterToTPRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-gather the last dim (rank order). Backward: keep this rank's slice."""
    return x if group is None else _GatherFromTPRegion.apply(x, group)
