"""The tensor collectives, each written once. A ``None`` group is a group of one: no
communication.

The autograd mappings (tensor and sequence parallelism), the vocab-parallel
cross-entropy, state-dict gathering, gradient clipping, the loss scaler, ZeRO
checkpoints, evaluation and the tests call these instead of ``torch.distributed``, so
"what does a size-one dimension cost" has one answer: nothing. (Job-wide
synchronisation, barriers and the exchange of error messages, stays with
``torch.distributed`` where it is used.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel.state import group_size

SUM, MAX, MIN = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN


def all_reduce(x: torch.Tensor, group, op=SUM) -> torch.Tensor:
    """Reduce ``x`` over ``group`` in place (``op``: SUM, MAX or MIN) and return it.

    NOTE: in place. Reduce a copy when ``x`` may be a tensor autograd saved for backward.
    """
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_list(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape everywhere), in rank order; ``[x]`` for a group of one."""
    n = group_size(group)
    if n == 1:
        return [x]
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return parts


def all_gather(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order; ``x`` for a group of one."""
    parts = all_gather_list(x, group)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's chunk of ``dim`` (``x`` split into
    ``group`` size equal chunks, rank order); ``x`` for a group of one."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    parts = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, op=SUM, group=group)
    return out
