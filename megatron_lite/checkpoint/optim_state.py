"""Optimizer state in the checkpoint's full form: per parameter name, tensors unsharded.

Both engines go through these functions: the DDP engine with the optimizer's own
per-parameter state, the ZeRO engine after assembling each parameter's state from its
DP partitions (:mod:`megatron_lite.training.zero`). The saved form is

    {"state": {param_name: {"exp_avg": full tensor, "exp_avg_sq": ..., "step": ...}},
     "param_groups": [group hyperparameters without "params", ...]}

and it loads at any TP size: tensors are gathered and sharded like their parameter
(:func:`~megatron_lite.parallel.state_dict.gather_like` / ``shard_like``).
"""

from __future__ import annotations

import torch

from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.state_dict import gather_like, shard_like


def gather_param_state(p: torch.Tensor, entry: dict, tp_group) -> dict:
    """A parameter's state with every tensor shaped like ``p`` in full (collective over TP).

    Args:
        p: the (TP-local) parameter; its ``tp_dim``/``tp_stride`` say how it is split.
        entry: its state (``exp_avg``... shaped like ``p``; ``step`` a scalar).
        tp_group: the TP group.
    """
    out = {}
    for key, value in entry.items():
        if torch.is_tensor(value) and value.dim() > 0:
            out[key] = gather_like(p, value, tp_group)
        else:  # Adam's step counter: the same on every rank
            out[key] = value.clone() if torch.is_tensor(value) else value
    return out


def shard_param_state(p: torch.Tensor, saved: dict, tp_group, device: torch.device,
                      step_on_device: bool) -> dict:
    """This rank's part of a :func:`gather_param_state` entry, on ``device`` (no communication).

    Args:
        step_on_device: keep scalar tensors (``step``) on ``device``, as fused or
            capturable Adam wants them; otherwise they stay on the CPU.
    """
    out = {}
    for key, value in saved.items():
        if torch.is_tensor(value) and value.dim() > 0:
            out[key] = shard_like(p, value, tp_group).to(device).clone()
        elif torch.is_tensor(value):
            out[key] = value.to(device) if step_on_device else value.clone()
        else:
            out[key] = value
    return out


def step_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps its step counters with the parameters (fused/capturable)."""
    return bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings (lr, betas, weight decay...), without the parameters."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def load_group_hyperparameters(optimizer: torch.optim.Optimizer, saved: list[dict]) -> None:
    for group, values in zip(optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in values.items() if k != "params"})


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         ctx: ParallelContext) -> dict:
    """The DDP engine's optimizer state in full form (collective over TP)."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: gather_param_state(p, optimizer.state.get(p, {}), ctx.tp_group)
             for group in optimizer.param_groups for p in group["params"]}
    return {"state": state, "param_groups": group_hyperparameters(optimizer)}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              full: dict, ctx: ParallelContext) -> None:
    """Reshard a :func:`full_optimizer_state` into this rank's optimizer.

    Raises:
        KeyError: a parameter of the optimizer has no saved state.
    """
    load_group_hyperparameters(optimizer, full["param_groups"])
    names = {id(p): n for n, p in model.named_parameters()}
    on_device = step_on_device(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name not in full["state"]:
                raise KeyError(f"no optimizer state for {name}")
            optimizer.state[p] = shard_param_state(p, full["state"][name], ctx.tp_group,
                                                   p.device, on_device)
