"""Transformer-XL's evaluation speed claim (Dai et al. 2019: up to 1,800x faster than a
vanilla model re-reading its whole window for every new token), on this machine.

    python bench/xl_speed.py            # about 2 minutes on 2 cores

Both models: 4 layers, hidden 256, 4 heads, vocab 8192, TP=1, fp32, random weights
(speed only). XL: segments of 64 tokens with a memory of 448, so every token sees up to
512 positions. Vanilla (learned positions, 512): a sliding window of 512 tokens that
predicts one new token per forward, so every prediction also sees 512 positions. Then
training: step time (fwd + bwd) and the activations autograd saves, seq 128, with and
without a memory of 128.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.models import GPTModel  # noqa: E402
from megatron_lite.models.relative import Memory  # noqa: E402

BASE = dict(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=8192,
            hidden_dropout=0.0, attention_dropout=0.0)


@torch.no_grad()
def xl_tokens_per_sec(tokens: torch.Tensor, segment: int, memory: int) -> float:
    model = GPTModel(ModelConfig(**BASE, position_embedding="relative", mem_len=memory,
                                 seq_length=segment, max_position_embeddings=segment)).eval()
    mem = Memory(memory)
    for start in range(0, memory + segment, segment):  # warm: fill the memory first
        model(tokens[:, start:start + segment], memory=mem)
    n, tick = 0, time.perf_counter()
    for start in range(memory + segment, tokens.shape[1] - segment + 1, segment):
        model(tokens[:, start:start + segment], memory=mem)
        n += segment
    return n / (time.perf_counter() - tick)


@torch.no_grad()
def sliding_tokens_per_sec(tokens: torch.Tensor, window: int, predictions: int) -> float:
    model = GPTModel(ModelConfig(**BASE, seq_length=window,
                                 max_position_embeddings=window)).eval()
    model(tokens[:, :window])  # warm
    tick = time.perf_counter()
    for t in range(predictions):  # one forward of the last `window` tokens per new token
        model(tokens[:, t + 1:t + 1 + window])
    return predictions / (time.perf_counter() - tick)


def train_step(mem_len: int, seq: int = 128, steps: int = 5) -> tuple[float, float]:
    """(median step seconds, MiB autograd saves) with a memory of ``mem_len``."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**BASE, position_embedding="relative", mem_len=mem_len,
                                 seq_length=seq, max_position_embeddings=seq)).train()
    mem = Memory(mem_len)
    ids = torch.randint(0, 8192, (8, (steps + 2) * seq + 1))
    times, saved = [], 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    for step in range(steps + 2):
        x, y = ids[:, step * seq:(step + 1) * seq], ids[:, step * seq + 1:(step + 1) * seq + 1]
        saved = 0
        tick = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, y, memory=mem)
        loss.backward()
        times.append(time.perf_counter() - tick)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[2:]), saved / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--predictions", type=int, default=64, help="sliding-window forwards")
    a = p.parse_args()
    torch.manual_seed(0)
    tokens = torch.randint(0, 8192, (1, 4096))
    xl = xl_tokens_per_sec(tokens, 64, 448)
    vanilla = sliding_tokens_per_sec(tokens, 512, a.predictions)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 4L h256, batch 1, "
          "512 positions of context per prediction")
    print(f"evaluation tokens/s   XL (segment 64, memory 448) {xl:10.1f}")
    print(f"                      vanilla, sliding window 512 {vanilla:10.1f}")
    print(f"                      XL / vanilla                {xl / vanilla:10.1f}x")
    base_t, base_m = train_step(0)
    mem_t, mem_m = train_step(128)
    print("training, seq 128, batch 8: step s / saved activations MiB")
    print(f"  no memory        {base_t:6.3f} s  {base_m:7.1f} MiB")
    print(f"  memory 128       {mem_t:6.3f} s  {mem_m:7.1f} MiB   "
          f"({mem_t / base_t:.2f}x time, {mem_m / base_m:.2f}x memory)")


if __name__ == "__main__":
    main()
