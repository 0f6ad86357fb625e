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

Sequence parallelism (Korthikanti et al. 2022) splits the activations *between* the TP
regions along the sequence (dim 1 of ``[b, s, h]``) and turns the two all-reduces of a
sublayer into an all-gather and a reduce-scatter (the same bytes):

===========================  ==========================  ==========================
function                     forward                     backward
===========================  ==========================  ==========================
scatter_to_sequence_region   keep own slice of the seq   all-gather along the seq
gather_from_sequence_region  all-gather along the seq    reduce-scatter (partial
                                                         grads) or own slice
reduce_scatter_to_sequence   reduce-scatter along seq    all-gather along the seq
sequence_parallel_linear     all-gather, then X A + b    reduce-scatter dX; dA from
                             (keeps only the shard)      the input gathered again
===========================  ==========================  ==========================

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

from megatron_lite.parallel.comm import all_gather, all_reduce, reduce_scatter
from megatron_lite.parallel.state import SequenceParallel, group_rank, group_size


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


# -- sequence parallelism ---------------------------------------------------------------

SEQ_DIM = 1  # activations are [b, s, h]


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return funcol.all_gather_tensor(x.contiguous(), SEQ_DIM, group)
    return all_gather(x, group, dim=SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return funcol.reduce_scatter_tensor(x.contiguous(), "sum", SEQ_DIM, group)
    return reduce_scatter(x, group, dim=SEQ_DIM)


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if x.shape[SEQ_DIM] % n:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by TP size {n}")
    return x.chunk(n, dim=SEQ_DIM)[group_rank(group)].contiguous()


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, partial_grad):
        ctx.group, ctx.partial_grad = group, partial_grad
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial_grad:
            return _reduce_scatter_seq(grad, ctx.group), None, None
        return _split_seq(grad, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _SequenceParallelLinear(torch.autograd.Function):
    """``all_gather(x) @ W^T + b`` saving only ``x``'s shard: backward gathers it again for
    ``dW`` (Megatron's way: the gathered input is never stored between the passes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(_gather_seq(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # NOTE: under autocast the output (and grad) may be lower precision than x and W:
        # compute in the grad's dtype, as autocast's matmul did forward
        full = _gather_seq(x, ctx.group).to(grad.dtype)  # [b, s, in]
        grad_x = _reduce_scatter_seq(grad.matmul(weight.to(grad.dtype)), ctx.group)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t().matmul(full.reshape(-1, full.shape[-1])).to(weight.dtype)
        grad_b = g2.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_x.to(x.dtype), grad_w, grad_b, None


def scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: keep this rank's slice of the sequence (dim 1). Backward: all-gather it.

    Enters the sequence-parallel region from a replicated ``[b, s, h]``."""
    return x if group is None else _ScatterToSequenceRegion.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group, partial_grad: bool = True
                                ) -> torch.Tensor:
    """Forward: all-gather the sequence (dim 1) in rank order. Backward: reduce-scatter
    the gradient (``partial_grad``: each rank's gradient is a partial sum, as out of a
    vocab-parallel output layer) or keep this rank's slice of it (the gradient is the
    same on every rank: the consumer is replicated)."""
    return x if group is None else _GatherFromSequenceRegion.apply(x, group, partial_grad)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: sum the partial ``[b, s, h]`` over ``group`` and keep this rank's slice
    of the sequence. Backward: all-gather the gradient. Leaves a row-parallel core."""
    return x if group is None else _ReduceScatterToSequenceRegion.apply(x, group)


def sequence_parallel_linear(x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, group) -> torch.Tensor:
    """A column-parallel core entered from the sequence-parallel region: ``x`` is this
    rank's ``[b, s/tp, in]``; returns ``[b, s, out/tp]``. Forward all-gathers ``x``;
    backward reduce-scatters ``dX`` and gathers ``x`` again for ``dW``, so only the
    shard is saved. Under ``torch.compile`` it is the gather followed by ``F.linear``
    (the compiler plans what is saved)."""
    if group is None:
        return torch.nn.functional.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.nn.functional.linear(gather_from_sequence_region(x, group), weight, bias)
    return _SequenceParallelLinear.apply(x, weight, bias, group)


def gather_sequence_for_head(x: torch.Tensor, sp: SequenceParallel, group,
                             partial_grad: bool = True) -> torch.Tensor:
    """The final hidden states as a head needs them: all of the sequence. While ``sp`` is
    active, ``x`` is this rank's ``[b, s/tp, h]`` and is all-gathered
    (:func:`gather_from_sequence_region`; ``partial_grad`` for a vocab-parallel output
    layer, whose input gradient is a partial sum: it then replaces that layer's
    :func:`copy_to_tp_region`); otherwise ``x`` is returned as it is."""
    if not sp.active:
        return x
    return gather_from_sequence_region(x, group, partial_grad)
