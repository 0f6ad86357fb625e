"""What distillation costs: a MiniLM / MiniLMv2 step against the student's plain step.

    python bench/distill_speed.py        # about a minute on 2 cores

Teacher: GPT 6 layers, h 256, 8 heads; student: 3 layers, h 128, 8 heads; seq 128,
batch 8, vocab 8192, fp32, TP=1, AdamW on the student. Median of the timed steps. The
teacher runs without an autograd graph; the share column is its forward's part of the
distillation step. Memory: what the step holds for backward (autograd's saved tensors,
counted by storage), teacher and student together.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.experiments.distill import attention_layers  # noqa: E402
from megatron_lite.experiments.relations import minilm_losses, minilmv2_losses  # noqa: E402
from megatron_lite.models import GPTModel  # noqa: E402
from megatron_lite.models.attention import captured  # noqa: E402

STEPS, WARMUP = 6, 2


def model(layers: int, hidden: int) -> GPTModel:
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=8,
                      seq_length=128, max_position_embeddings=128, vocab_size=8192,
                      hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(cfg)


def main() -> int:
    torch.manual_seed(0)
    teacher, student = model(6, 256).eval().requires_grad_(False), model(3, 128)
    optim = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, 8192, (8, 128))
    labels = torch.randint(0, 8192, (8, 128))
    t_layer, s_layer = attention_layers(teacher)[-1], attention_layers(student)[-1]
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def plain():
        loss = student(ids, labels)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    def distil(method):
        def step():
            with captured([t_layer, s_layer]) as (seen_t, seen_s):
                tick = time.perf_counter()
                with torch.no_grad():
                    teacher(ids)
                teacher_s = time.perf_counter() - tick
                own = student(ids, labels)
            t, s = seen_t[0], seen_s[0]
            parts = minilm_losses(t, s, 8, None) if method == "minilm" else \
                minilmv2_losses(t, s, 8, 1, None)
            (sum(parts.values()) + 0.0 * own).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            return teacher_s
        return step

    def timed(fn):
        times, shares = [], []
        for i in range(WARMUP + STEPS):
            tick = time.perf_counter()
            share = fn()
            if i >= WARMUP:
                times.append(time.perf_counter() - tick)
                shares.append(share or 0.0)
        return statistics.median(times), statistics.median(shares)

    def held(fn):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(saved.values())

    base, _ = timed(plain)
    base_mem = held(plain)
    print("GPT teacher 6L h256, student 3L h128 (8 heads each), seq 128, batch 8, fp32")
    print(f"{'step':<24} {'seconds':>8} {'x plain':>8} {'teacher share':>14} "
          f"{'saved MiB':>10} {'x plain':>8}")
    print(f"{'student alone':<24} {base:8.3f} {1.0:8.2f} {'':>14} {base_mem / 2**20:10.1f} "
          f"{1.0:8.2f}")
    for method in ("minilm", "minilmv2"):
        seconds, teacher_s = timed(distil(method))
        mem = held(distil(method))
        print(f"{method + ' distillation':<24} {seconds:8.3f} {seconds / base:8.2f} "
              f"{teacher_s / seconds:14.0%} {mem / 2**20:10.1f} {mem / base_mem:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
