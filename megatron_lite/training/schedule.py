"""Learning-rate schedule: linear warmup, then cosine / linear decay to ``min_lr``, or constant."""

from __future__ import annotations

import dataclasses
import math

from megatron_lite.config import Config, OptimConfig


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly from ``lr / warmup`` at step 0 to ``lr`` at ``warmup_steps``;
    decay then runs from ``lr`` to ``min_lr`` at ``max_steps`` and stays there.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_style == "constant":
        return cfg.lr
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.decay_style == "linear":
        factor = 1.0 - progress
    elif cfg.decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optim.decay_style={cfg.decay_style!r} is not one of cosine, linear, "
                         "constant")
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def schedule_of(cfg: Config) -> dict:
    """The keys that define a run's LR schedule, by name (saved with every checkpoint)."""
    o = cfg.optim
    return {"optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.warmup_steps": o.warmup_steps,
            "optim.decay_style": o.decay_style, "train.max_steps": cfg.train.max_steps}


def scheduled_lr(schedule: dict, optim: OptimConfig, step: int) -> float:
    """:func:`learning_rate` of a :func:`schedule_of` dict at ``step``."""
    keys = {k.split(".")[1]: v for k, v in schedule.items() if k.startswith("optim.")}
    return learning_rate(step, dataclasses.replace(optim, **keys), schedule["train.max_steps"])
