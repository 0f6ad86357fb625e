"""Learning-rate schedule: linear warmup, then cosine / linear decay to ``min_lr``, or constant."""

from __future__ import annotations

import math

from megatron_lite.config import OptimConfig


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
