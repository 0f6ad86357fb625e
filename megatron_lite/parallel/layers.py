"""Tensor-parallel linear and embedding layers (Megatron-LM, Shoeybi et al. 2019).

Initialization: every rank draws the *full* weight from the default generator (seeded
identically on all TP ranks) and keeps its own slice. A model built at TP=N therefore
starts bit-identical to the same model built at TP=1, and only one layer's full
weight exists at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel.comm import all_reduce
from megatron_lite.parallel.mappings import (
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_tp_region,
    sequence_parallel_linear,
)
from megatron_lite.parallel.state import SequenceParallel, group_rank, group_size
from megatron_lite.parallel.utils import divide, shard_tensor, vocab_range

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def normal_init(std: float = 0.02) -> InitMethod:
    """N(0, std) in place."""
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """N(0, std / sqrt(2 * num_layers)) for layers that write into the residual stream."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def init_shard_(shard: torch.Tensor, full_shape, init_method: InitMethod, dim: int,
                 stride: int, group, drawn_rows: int | None = None) -> None:
    """Fill ``shard`` with this rank's slice of a full weight drawn by ``init_method``.

    ``drawn_rows``: draw only the first rows (a real vocab) and zero the rest (padding),
    so the random stream does not depend on the TP-dependent padded size.
    """
    if shard.device.type == "meta":  # shapes only: nothing to draw
        return
    # NOTE: draw in fp32 whatever the parameter dtype, so the random stream (and hence
    # every later layer's weights) does not depend on the precision chosen.
    full = torch.zeros(full_shape, dtype=torch.float32, device=shard.device)
    init_method(full if drawn_rows is None else full[:drawn_rows])
    with torch.no_grad():
        shard.copy_(shard_tensor(full, dim, group_rank(group), group_size(group), stride))


def mark_tp(param: nn.Parameter, dim: int | None, stride: int = 1,
            vocab_dim: int | None = None) -> None:
    """Record how a parameter is sharded across TP.

    ``tp_dim`` (None = replicated), ``tp_stride`` (fused blocks along it) and
    ``vocab_dim`` (the dim padded to the TP-dependent vocab size, if any). Gradient
    clipping, checkpoint resharding and HF conversion read these attributes.
    """
    param.tp_dim = dim
    param.tp_stride = stride
    param.vocab_dim = vocab_dim


def mark_sequence_parallel(param: nn.Parameter, sp: SequenceParallel | None, tp_group) -> None:
    """A replicated parameter used inside the sequence-parallel region (a LayerNorm's
    weight and bias, a bias added after a reduce-scatter): each TP rank sees only its
    part of the sequence, so its gradient is the sum over the TP group.

    Marks it ``param.sequence_parallel = True`` (for any engine) and, when ``sp`` is
    enabled, sums its gradient over ``tp_group`` as backward produces it (a tensor hook:
    it runs before the gradient is accumulated, so DDP, ZeRO, fp32 main gradients and
    the clip all see the summed gradient, identical on the TP ranks; the clip counts it
    once, as a replica). A backward of a forward that did not split the sequence
    (``sp.active`` false) is left alone.
    """
    if sp is None or not sp.enabled or group_size(tp_group) == 1:
        return
    param.sequence_parallel = True

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        return all_reduce(grad.clone(), tp_group) if sp.active else grad

    param.register_hook(reduce)


def mark_sequence_parallel_module(module: nn.Module, sp: SequenceParallel | None,
                                  tp_group) -> nn.Module:
    """:func:`mark_sequence_parallel` every parameter of ``module`` (a norm that runs on
    the sequence shard); returns it."""
    for p in module.parameters():
        mark_sequence_parallel(p, sp, tp_group)
    return module


class ColumnParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split by columns: rank r computes ``Y_r = X A_r + b_r``.

    Args:
        in_features, out_features: full (unsharded) sizes.
        bias: add a (sharded) bias.
        gather_output: all-gather ``Y`` so every rank returns the full output;
            otherwise each returns its ``[..., out/tp]`` slice.
        init_method: fills the full ``[out, in]`` weight in place.
        stride: number of fused blocks in the output (3 for ``[Q|K|V]``).
        tp_group: the TP process group (``None`` = no TP).
        sequence_parallel: the context's :class:`SequenceParallel`: while it is active
            the input is this rank's ``[b, s/tp, in]`` slice of the sequence, all-gathered
            here (backward: reduce-scattered) instead of copied.
        device, dtype: where and how to allocate the shard.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 gather_output: bool = False, init_method: InitMethod | None = None,
                 stride: int = 1, tp_group=None, sequence_parallel: SequenceParallel | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        tp = group_size(tp_group)
        if gather_output and stride > 1:
            raise ValueError("gather_output with stride > 1 would interleave the fused blocks")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.tp_group = gather_output, tp_group
        self.out_per_rank = divide(out_features, tp, "out_features")
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features,
                                               device=device, dtype=dtype))
        init_shard_(self.weight, (out_features, in_features), init_method or normal_init(),
                     0, stride, tp_group)
        mark_tp(self.weight, 0, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank, device=device, dtype=dtype))
            mark_tp(self.bias, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sp = self.sequence_parallel
        if sp is not None and sp.active:  # x: [b, s/tp, in]
            y = sequence_parallel_linear(x, self.weight, self.bias, self.tp_group)
        else:
            x = copy_to_tp_region(x, self.tp_group)  # [..., in]
            y = F.linear(x, self.weight, self.bias)  # [..., out/tp]
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (/{group_size(self.tp_group)})"


class RowParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split by rows: ``Y = sum_r X_r A_r + b`` (one all-reduce).

    Args:
        in_features, out_features: full (unsharded) sizes.
        bias: add a bias (replicated, added once after the all-reduce).
        input_is_parallel: the input is already this rank's ``[..., in/tp]`` slice
            (the output of a :class:`ColumnParallelLinear`); otherwise it is scattered.
        init_method: fills the full ``[out, in]`` weight in place.
        tp_group: the TP process group (``None`` = no TP).
        sequence_parallel: the context's :class:`SequenceParallel`: while it is active
            the partial sums are reduce-scattered along the sequence (this rank returns
            ``[b, s/tp, out]``) instead of all-reduced; the bias, added there, is
            marked :func:`mark_sequence_parallel`.
        device, dtype: where and how to allocate the shard.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 input_is_parallel: bool = False, init_method: InitMethod | None = None,
                 tp_group=None, sequence_parallel: SequenceParallel | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        tp = group_size(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.tp_group = input_is_parallel, tp_group
        self.in_per_rank = divide(in_features, tp, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank,
                                               device=device, dtype=dtype))
        init_shard_(self.weight, (out_features, in_features), init_method or normal_init(),
                     1, 1, tp_group)
        mark_tp(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
            mark_tp(self.bias, None)
            mark_sequence_parallel(self.bias, sequence_parallel, tp_group)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)  # [..., in/tp]
        sp = self.sequence_parallel
        if sp is not None and sp.active:  # partial [b, s, out] -> summed [b, s/tp, out]
            y = reduce_scatter_to_sequence_region(F.linear(x, self.weight), self.tp_group)
        else:
            y = reduce_from_tp_region(F.linear(x, self.weight), self.tp_group)  # [..., out]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features} (/{group_size(self.tp_group)}), out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocab rows; each rank owns a contiguous id range.

    Ids outside this rank's range look up row 0 and are zeroed, then one all-reduce sums
    the ranks' contributions (exactly one rank contributes each id).

    Args:
        num_embeddings: the (padded) vocab size; divisible by the TP size.
        embedding_dim: hidden size.
        init_method: fills the full ``[vocab, dim]`` weight in place.
        vocab_size: the real vocab size: only these rows are drawn, padding rows start at
            zero, so the init is the same at every TP size (default: all rows).
        tp_group: the TP process group (``None`` = no TP).
        device, dtype: where and how to allocate the shard.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 init_method: InitMethod | None = None, vocab_size: int | None = None,
                 tp_group=None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tp_group = (
            num_embeddings, embedding_dim, tp_group)
        self.vocab_start, self.vocab_end = vocab_range(
            num_embeddings, group_rank(tp_group), group_size(tp_group))
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim,
                                               device=device, dtype=dtype))
        init_shard_(self.weight, (num_embeddings, embedding_dim), init_method or normal_init(),
                     0, 1, tp_group, drawn_rows=vocab_size)
        mark_tp(self.weight, 0, vocab_dim=0)

    def forward(self, ids: torch.Tensor, scatter_sequence: bool = False) -> torch.Tensor:
        """``[b, s]`` ids -> ``[b, s, h]``; ``scatter_sequence``: reduce-scatter the ranks'
        contributions along the sequence instead (this rank's ``[b, s/tp, h]``: the
        entry of a sequence-parallel region, half the bytes of the all-reduce)."""
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight)  # [..., h]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if scatter_sequence:
            return reduce_scatter_to_sequence_region(out, self.tp_group)
        return reduce_from_tp_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (/{group_size(self.tp_group)}: "
                f"[{self.vocab_start}, {self.vocab_end})), {self.embedding_dim}")


class SharedColumnLinear(nn.Module):
    """A column-parallel linear whose output has fewer blocks than there are TP ranks:
    ``out_features`` is ``blocks`` equal blocks (e.g. the K heads of grouped-query
    attention), TP size a multiple of ``blocks``, and rank r computes block
    ``r // (tp / blocks)`` -- each block is shared by ``tp / blocks`` neighbouring ranks.

    The weight is replicated (whole on every rank, ``tp_dim`` None, so it checkpoints and
    converts as one full tensor at every layout). Each rank's gradient covers only its
    block, from its own consumers; the weight enters through :func:`copy_to_tp_region`,
    whose backward sums the gradients over TP: every rank then holds the full gradient
    (the ranks sharing a block added up), identical everywhere, as a replicated
    parameter's must be.
    """

    def __init__(self, in_features: int, out_features: int, blocks: int, *, bias: bool = True,
                 init_method: InitMethod | None = None, tp_group=None, device=None,
                 dtype=None):
        super().__init__()
        tp = group_size(tp_group)
        if tp % blocks or out_features % blocks:
            raise ValueError(f"{blocks} blocks of {out_features} outputs do not share "
                             f"evenly over TP size {tp}")
        self.in_features, self.out_features, self.tp_group = in_features, out_features, tp_group
        size = out_features // blocks
        self.start = group_rank(tp_group) // (tp // blocks) * size
        self.size = size
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype))
        init_shard_(self.weight, (out_features, in_features), init_method or normal_init(),
                     0, 1, None)
        mark_tp(self.weight, None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
            mark_tp(self.bias, None)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp_region(x, self.tp_group)  # [..., in]
        rows = slice(self.start, self.start + self.size)
        weight = copy_to_tp_region(self.weight, self.tp_group)[rows]
        bias = None if self.bias is None else copy_to_tp_region(self.bias, self.tp_group)[rows]
        return F.linear(x, weight, bias)  # [..., out / blocks]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (rows {self.start}:"
                f"{self.start + self.size} here)")
