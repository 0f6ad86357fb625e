"""Full (unsharded) state dicts from, and into, a tensor-parallel model.

A parameter says how it is sharded through the attributes set by
:func:`megatron_lite.parallel.layers.mark_tp`; everything else is replicated. These two
functions are the basis of HF conversion and of loading at another TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel.state import group_rank, group_size
from megatron_lite.parallel.utils import merge_shards, shard_tensor


def full_state_dict(model: nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` in full; collective over ``tp_group``.

    The vocab dim stays padded to this model's padded size. Every rank gets the
    whole dict (fine for conversion tools; a checkpoint of a big model saves shards).
    """
    n = group_size(tp_group)
    out = {}
    for name, p in model.named_parameters():
        dim = getattr(p, "tp_dim", None)
        t = p.detach()
        if dim is None or n == 1:
            out[name] = t.clone()
            continue
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t.contiguous(), group=tp_group)
        out[name] = merge_shards(parts, dim, getattr(p, "tp_stride", 1))
    for name, b in model.named_buffers():
        out[name] = b.detach().clone()
    return out


def _fit_vocab(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Pad (with zeros) or trim the vocab dim to ``size``."""
    have = t.shape[dim]
    if have >= size:
        return t.narrow(dim, 0, size)
    pad_shape = list(t.shape)
    pad_shape[dim] = size - have
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], tp_group=None) -> None:
    """Copy this rank's slice of every full tensor into ``model`` (no communication).

    The vocab dim of a full tensor may be unpadded (HF) or padded for another TP size:
    it is padded with zeros or trimmed to this model's padded size.

    Raises:
        KeyError: a parameter is missing from ``full``, or ``full`` has extra keys.
        ValueError: a shape does not fit.
    """
    rank, n = group_rank(tp_group), group_size(tp_group)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing, extra = sorted(set(own) - set(full)), sorted(set(full) - set(own))
    if missing or extra:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, p in own.items():
        t = full[name]
        vocab_dim = getattr(p, "vocab_dim", None)
        dim = getattr(p, "tp_dim", None)
        if vocab_dim is not None:
            t = _fit_vocab(t, vocab_dim, p.shape[vocab_dim] * (n if dim == vocab_dim else 1))
        if dim is not None:
            t = shard_tensor(t, dim, rank, n, getattr(p, "tp_stride", 1))
        if t.shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(p.shape)}")
        p.copy_(t)
