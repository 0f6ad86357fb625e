"""What one PAR supernet step costs: about the sum of its branches.

    python bench/par_search_speed.py        # about a minute on 2 cores

GPT, hidden 256, 4 heads, seq 256, batch 8, vocab 8192, TP=1, fp32, fwd + bwd: the
supernet of 12 mixed blocks (attention + feed-forward + identity each) against a plain
(sf)^6 model (12 sublayers, what the search selects from) and a plain (sf)^12 model
(24 sublayers: every branch of every block).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.experiments.search import build_supernet  # noqa: E402
from megatron_lite.models import GPTModel  # noqa: E402
from megatron_lite.parallel import ParallelContext  # noqa: E402

BASE = dict(hidden_size=256, num_attention_heads=4, seq_length=256,
            max_position_embeddings=256, vocab_size=8192, hidden_dropout=0.0,
            attention_dropout=0.0)


def step_time(model, steps: int = 8) -> float:
    ids = torch.randint(0, 8192, (8, 256))
    times = []
    for step in range(steps + 2):
        if hasattr(model.transformer, "key"):
            model.transformer.key = (step, 0)
        tick = time.perf_counter()
        model(ids, ids).backward()
        times.append(time.perf_counter() - tick)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def main() -> None:
    torch.manual_seed(0)
    supernet = build_supernet(12, "sfi")(ModelConfig(**BASE, num_layers=6), ParallelContext())
    six, twelve = GPTModel(ModelConfig(**BASE, num_layers=6)), \
        GPTModel(ModelConfig(**BASE, num_layers=12))
    times = {"supernet, 12 blocks": step_time(supernet.train()),
             "plain (sf)^6": step_time(six.train()), "plain (sf)^12": step_time(twelve.train())}
    ref = times["plain (sf)^6"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; h256 seq 256 batch 8, "
          "fwd + bwd, median of 8 steps")
    for name, t in times.items():
        print(f"{name:22}{t:8.3f} s  {t / ref:5.2f}x (sf)^6  "
              f"{t / times['plain (sf)^12']:5.2f}x (sf)^12")


if __name__ == "__main__":
    main()
