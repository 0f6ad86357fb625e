"""Adaptive attention span saves compute: step time and attention memory at S = 1024.

    python bench/adaptive_span_speed.py        # about 10 seconds on 2 cores

A Transformer-XL GPT (4 layers, hidden 256, 4 heads, segment 128, memory 1024, batch 4,
TP=1, fp32, random weights) with a fixed full span (plain relative attention over the
whole memory) against the same model with adaptive spans set to average ~100 positions
(0.06-0.14 of S per head, as a trained model's lower layers; Sukhbaatar et al. report
averages far below S). Training step (fwd + bwd), the bytes autograd saves (the
attention's activations dominate), and evaluation tokens/s with the memory carried.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.models import GPTModel  # noqa: E402
from megatron_lite.models.adaptive_span import span_modules  # noqa: E402
from megatron_lite.models.relative import Memory  # noqa: E402

S, SEG, BATCH = 1024, 128, 4
BASE = dict(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=8192,
            hidden_dropout=0.0, attention_dropout=0.0, position_embedding="relative",
            mem_len=S, seq_length=SEG, max_position_embeddings=SEG)


def model(adaptive: bool) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(**BASE, adaptive_span=adaptive, attn_span=S if adaptive else 0)
    m = GPTModel(cfg)
    for layer, span in enumerate(span_modules(m)):
        with torch.no_grad():  # spans ~60-140 positions, ~100 on average
            span.fraction.copy_(torch.tensor([0.06, 0.08, 0.1, 0.14]) + 0.005 * layer)
    return m


def measure(adaptive: bool, steps: int = 6) -> tuple[float, float, float]:
    """(train step s, MiB saved for backward, evaluation tokens/s)."""
    m = model(adaptive)
    ids = torch.randint(0, 8192, (BATCH, S + (steps + 3) * SEG + 1))
    mem = Memory(S)
    with torch.no_grad():  # fill the memory
        for start in range(0, S, SEG):
            m(ids[:, start:start + SEG], memory=mem)
    times, saved = [], 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    m.train()
    for step in range(steps + 2):
        start = S + step * SEG
        saved = 0
        tick = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(ids[:, start:start + SEG], ids[:, start + 1:start + SEG + 1], memory=mem)
        loss.backward()
        times.append(time.perf_counter() - tick)
        m.zero_grad(set_to_none=True)
    m.eval()
    tick, n = time.perf_counter(), 0
    with torch.no_grad():
        for start in range(S, S + (steps + 2) * SEG, SEG):
            m(ids[:, start:start + SEG], memory=mem)
            n += BATCH * SEG
    return statistics.median(times[2:]), saved / 2**20, n / (time.perf_counter() - tick)


def main() -> None:
    full, adaptive = measure(False), measure(True)
    spans = [float(s.z().detach().mean()) for s in span_modules(model(True))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 4L h256, segment "
          f"{SEG}, memory {S}, batch {BATCH}; adaptive spans by layer "
          + ", ".join(f"{z:.0f}" for z in spans))
    print(f"{'':22}{'train step s':>13}{'saved MiB':>11}{'eval tok/s':>12}")
    print(f"{'fixed span 1024':22}{full[0]:13.3f}{full[1]:11.0f}{full[2]:12.0f}")
    print(f"{'adaptive (~100)':22}{adaptive[0]:13.3f}{adaptive[1]:11.0f}{adaptive[2]:12.0f}")
    print(f"{'fixed / adaptive':22}{full[0] / adaptive[0]:12.2f}x{full[1] / adaptive[1]:10.2f}x"
          f"{adaptive[2] / full[2]:11.2f}x")


if __name__ == "__main__":
    main()
