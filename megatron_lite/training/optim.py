"""AdamW with Megatron's weight-decay groups, and the global gradient norm under TP."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_lite.config import OptimConfig
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import all_reduce


def param_groups(model: nn.Module, weight_decay: float, exclude=()) -> list[dict]:
    """Decay matrices and embeddings; not biases or LayerNorm parameters (all 1-D).
    Parameters in ``exclude`` are left out (they get a group of their own)."""
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in skip:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    extra_groups: list[dict] = ()):
    """NVIDIA apex's FusedAdam on CUDA when importable, else torch's fused / foreach AdamW.

    Args:
        extra_groups: more parameter groups with their own settings (e.g. the PAR search's
            architecture parameters, ``{"params": [...], "lr": ..., "weight_decay": ...}``);
            their parameters are left out of the model's groups.
    """
    exclude = [p for g in extra_groups for p in g["params"]]
    groups = param_groups(model, cfg.weight_decay, exclude) + list(extra_groups)
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, never the PyPI "apex"

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except ImportError:
            pass
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def is_replica(p: torch.Tensor, ctx: ParallelContext) -> bool:
    """A replicated parameter, counted on TP rank 0 only (its copies are identical), or
    the last pipeline stage's copy of the tied embedding (counted on the first)."""
    return (getattr(p, "tp_dim", None) is None and ctx.tp_rank != 0) or \
        getattr(p, "pipeline_copy", False)


def global_grad_norm(params, ctx: ParallelContext) -> float:
    """L2 norm of the whole model's gradient: shards summed over TP and the pipeline's
    stages (one reduction), replicas counted once.

    DP needs no reduction: gradients are already averaged across DP ranks.
    """
    grads = [p.grad for p in params if p.grad is not None and not is_replica(p, ctx)]
    if grads:
        sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in grads]).sum()
    else:
        sq = torch.zeros((), device=ctx.device)
    group = ctx.model_group if ctx.pp_size > 1 else ctx.tp_group  # TP x PP: one reduction
    return math.sqrt(all_reduce(sq, group).item())


def clip_grads_(params, max_norm: float, ctx: ParallelContext) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; return the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, ctx)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        torch._foreach_mul_([p.grad for p in params], scale)
    return norm
