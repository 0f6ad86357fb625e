"""LayerDrop's skipped layers cost nothing: step time at p = 0, 0.25, 0.5 on this machine.

    python bench/layerdrop_speed.py         # about 2 minutes on 2 cores

Forward + backward of a 12-layer GPT (hidden 256, 4 heads, seq 256, batch 8, vocab 8192,
TP=1, fp32), median of the timed steps, and the same with the transformer stack alone
(no embedding and no logits), whose time should fall by about p. A last row times p = 0.5
without the zero-gradient terms that give skipped layers' parameters a gradient (what
DDP needs without ``find_unused_parameters``), to show what they cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_lite.models.transformer as transformer  # noqa: E402
from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.models import GPTModel, set_layerdrop_key  # noqa: E402


def time_steps(cfg: ModelConfig, steps: int, stack_only: bool) -> float:
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (8, cfg.seq_length))
    x = torch.randn(8, cfg.seq_length, cfg.hidden_size, requires_grad=True)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        set_layerdrop_key(model, (0, step, 0))
        tick = time.perf_counter()
        out = model.transformer(x).square().mean() if stack_only else model(ids, ids)
        out.backward()
        times.append(time.perf_counter() - tick)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=15)
    a = p.parse_args()
    base = dict(num_layers=12, hidden_size=256, num_attention_heads=4, seq_length=256,
                max_position_embeddings=256, vocab_size=8192, hidden_dropout=0.0,
                attention_dropout=0.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 12L h256 seq 256 "
          f"batch 8, fwd + bwd, median of {a.steps} steps")
    print(f"{'layerdrop p':<28}{'model s':>9}{'x p=0':>8}{'stack s':>9}{'x p=0':>8}")
    ref = None
    rows = [("0", 0.0), ("0.25", 0.25), ("0.5", 0.5)]
    for label, drop in rows:
        cfg = ModelConfig(**base, layerdrop=drop)
        full, stack = time_steps(cfg, a.steps, False), time_steps(cfg, a.steps, True)
        ref = ref or (full, stack)
        print(f"{label:<28}{full:9.3f}{full / ref[0]:8.2f}{stack:9.3f}{stack / ref[1]:8.2f}")
    touch = transformer.zero_touch
    transformer.zero_touch = lambda module: torch.zeros(())  # no gradient for skipped layers
    try:
        cfg = ModelConfig(**base, layerdrop=0.5)
        full, stack = time_steps(cfg, a.steps, False), time_steps(cfg, a.steps, True)
    finally:
        transformer.zero_touch = touch
    print(f"{'0.5 without zero gradients':<28}{full:9.3f}{full / ref[0]:8.2f}{stack:9.3f}"
          f"{stack / ref[1]:8.2f}")


if __name__ == "__main__":
    main()
