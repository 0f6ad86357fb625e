"""Small arithmetic shared by the parallel layers, checkpoints and configs."""

from __future__ import annotations

import torch


def divide(numerator: int, denominator: int, what: str = "value") -> int:
    """Exact integer division, with an error that says what did not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by {denominator}")
    return numerator // denominator


def shard_tensor(full: torch.Tensor, dim: int, rank: int, size: int,
                 stride: int = 1) -> torch.Tensor:
    """This rank's shard of ``full`` along ``dim``.

    With ``stride > 1`` the dim is read as ``stride`` concatenated blocks (e.g. a fused
    ``[Q|K|V]`` weight, stride 3) and the rank takes its slice of *each* block, so every
    rank holds whole heads of Q, of K and of V, laid out ``[Q_r|K_r|V_r]``.

    The result may share memory with ``full`` (a view when no copy is needed).

    Args:
        full: the unsharded tensor.
        dim: the dimension to split.
        rank, size: position in and size of the TP group.
        stride: number of fused blocks along ``dim``.
    """
    if size == 1:
        return full
    if full.shape[dim] % (size * stride):
        raise ValueError(f"dim {dim} of size {full.shape[dim]} does not split into "
                         f"{size} ranks x {stride} blocks")
    if stride == 1:  # NOTE: no cat: keeps the init of a huge embedding at one full copy
        n = full.shape[dim] // size
        return full.narrow(dim, rank * n, n).contiguous()
    pieces = full.chunk(size * stride, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim).contiguous()


def merge_shards(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: rebuild the full tensor from every rank's shard."""
    if len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Round the vocab up to a multiple of ``divisible_by x tp_size`` (Megatron's rule).

    GPT-2's 50257 becomes 50304 at TP=1, 50432 at TP=2, 50688 at TP=4, 51200 at TP=8.
    """
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def vocab_range(padded_vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of the vocab ids owned by ``rank`` (contiguous, equal blocks)."""
    per_rank = divide(padded_vocab_size, size, "padded vocab size")
    return rank * per_rank, (rank + 1) * per_rank
