"""Mixed precision: fp32, bf16 autocast, and fp16 autocast with a dynamic loss scaler."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_lite.parallel.comm import MAX, all_reduce

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The forward-pass context for ``train.precision`` (parameters stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


class DynamicLossScaler:
    """fp16 loss scaling: skip the step and halve the scale on inf/NaN gradients,
    double it after ``growth_interval`` clean steps.

    The overflow check is all-reduced over the whole job, so every rank skips together.
    """

    def __init__(self, initial_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0):
        self.scale, self.growth_interval, self.min_scale = initial_scale, growth_interval, min_scale
        self.good_steps = 0
        self.skipped = 0

    def unscale_and_check(self, params, device: torch.device) -> bool:
        """Divide gradients by the scale; return True when they are all finite everywhere."""
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros(1, device=device)
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
            found += sum((~torch.isfinite(g)).any().float() for g in grads)
        all_reduce(found, dist.group.WORLD if dist.is_initialized() else None, MAX)
        return found.item() == 0

    def update(self, finite: bool) -> None:
        if finite:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2.0
        else:
            self.skipped += 1
            self.good_steps = 0
            self.scale = max(self.scale / 2.0, self.min_scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps, self.skipped = (
            state["scale"], state["good_steps"], state["skipped"])
