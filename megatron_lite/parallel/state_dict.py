"""Full (unsharded) state dicts from, and into, a tensor-parallel model.

A parameter says how it is sharded through the attributes set by
:func:`megatron_lite.parallel.layers.mark_tp`; everything else is replicated. These two
functions are the basis of HF conversion and of loading at another TP size.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.parallel.comm import all_gather_list
from megatron_lite.parallel.state import group_rank, group_size
from megatron_lite.parallel.utils import merge_shards, shard_tensor


def gather_like(p: torch.Tensor, local: torch.Tensor, tp_group=None) -> torch.Tensor:
    """The full form of ``local``, a tensor sharded like parameter ``p`` (collective over TP)."""
    dim = getattr(p, "tp_dim", None)
    local = local.detach()
    if dim is None or group_size(tp_group) == 1:
        return local.clone()
    return merge_shards(all_gather_list(local, tp_group), dim, getattr(p, "tp_stride", 1))


def shard_like(p: torch.Tensor, full: torch.Tensor, tp_group=None) -> torch.Tensor:
    """This rank's slice of ``full`` for parameter ``p`` (no communication).

    The vocab dim of ``full`` may be unpadded (HF) or padded for another TP size: it is
    padded with zeros or trimmed to this model's padded size.
    """
    rank, n = group_rank(tp_group), group_size(tp_group)
    vocab_dim, dim = getattr(p, "vocab_dim", None), getattr(p, "tp_dim", None)
    if vocab_dim is not None:
        full = _fit_vocab(full, vocab_dim, p.shape[vocab_dim] * (n if dim == vocab_dim else 1))
    if dim is not None:
        full = shard_tensor(full, dim, rank, n, getattr(p, "tp_stride", 1))
    if full.shape != p.shape:
        raise ValueError(f"shape {tuple(full.shape)} does not fit {tuple(p.shape)}")
    return full


def full_state_dict(model: nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` in full; collective over ``tp_group``.

    The vocab dim stays padded to this model's padded size. Every rank gets the
    whole dict (fine for conversion tools; a checkpoint of a big model saves shards).
    """
    out = {name: gather_like(p, p, tp_group) for name, p in model.named_parameters()}
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

    Raises:
        KeyError: a parameter is missing from ``full``, or ``full`` has extra keys.
        ValueError: a shape does not fit.
    """
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing, extra = sorted(set(own) - set(full)), sorted(set(full) - set(own))
    if missing or extra:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, p in own.items():
        try:
            p.copy_(shard_like(p, full[name], tp_group))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
