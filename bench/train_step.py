"""Training-step throughput and activation-checkpointing memory on this machine.

    python bench/train_step.py            # both tables (about 3 minutes on 2 cores)
    python bench/train_step.py --quick    # fewer timed steps

Table 1: forward + backward + AdamW of a tiny GPT-2 (6 layers, hidden 256, 4 heads,
seq 256, batch 8, vocab 50257) for megatron-lite (TP=1) eager and with
``train.compile`` (its regions compiled), a plain single-file PyTorch GPT-2
(bench/plain_gpt.py) and transformers' GPT2LMHeadModel, in fp32 and bf16 autocast.
Implementations are timed round-robin and the median step is reported.

Table 2: activation checkpointing none / selective / full on 12 layers at seq 512:
step time, bytes autograd saved for backward (the activation memory), and peak RSS
growth of a fresh process over a step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_gpt import PlainGPT  # noqa: E402

from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.models import GPTModel  # noqa: E402
from megatron_lite.parallel import ParallelContext  # noqa: E402
from megatron_lite.training.compile import compile_model  # noqa: E402

VOCAB = 50257
IMPLS = ("megatron-lite", "megatron-lite+compile", "plain", "transformers")


def model_flops(b: int, s: int, layers: int, h: int, vocab: int) -> float:
    """Forward + backward FLOPs of one step (Narayanan et al. 2021, without recompute)."""
    return 72 * b * s * layers * h * h * (1 + s / (6 * h) + vocab / (12 * h * layers))


def build(impl: str, layers: int, h: int, heads: int, seq: int, ckpt: str = "none"):
    torch.manual_seed(0)
    if impl.startswith("megatron-lite"):
        cfg = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=heads,
                          seq_length=seq, max_position_embeddings=seq, vocab_size=VOCAB,
                          activation_checkpointing=ckpt)
        ctx = ParallelContext()
        model = GPTModel(cfg, ctx)
        if impl.endswith("compile"):  # what train.compile=true does
            compile_model(model, ctx)
        return model, lambda ids, labels: model(ids, labels)
    if impl == "plain":
        model = PlainGPT(VOCAB + 47, seq, h, heads, layers)  # padded to 50304 like ours
        return model, lambda ids, labels: model(ids, labels)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers, n_embd=h, n_head=heads, n_positions=seq,
                                  vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(cfg)
    return model, lambda ids, labels: model(input_ids=ids, labels=ids).loss


def make_step(impl, precision, layers, h, heads, seq, batch, ckpt="none"):
    model, loss_fn = build(impl, layers, h, heads, seq, ckpt)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = torch.roll(ids, -1, 1)  # megatron-lite and plain take shifted labels

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def throughput_table(timed_steps: int) -> list[dict]:
    layers, h, heads, seq, batch = 6, 256, 4, 256, 8
    flops = model_flops(batch, seq, layers, h, VOCAB)
    rows = []
    for precision in ("fp32", "bf16"):
        steps = {impl: make_step(impl, precision, layers, h, heads, seq, batch)
                 for impl in IMPLS}
        times = {impl: [] for impl in steps}
        for step in steps.values():  # warm-up (and compilation)
            step(), step(), step()
        for _ in range(timed_steps):  # round-robin: machine noise hits all alike
            for impl, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - t0)
        for impl, ts in times.items():
            med = statistics.median(ts)
            rows.append({"precision": precision, "impl": impl, "step_s": med,
                         "tokens_per_s": batch * seq / med, "gflops": flops / med / 1e9})
    return rows


@contextlib.contextmanager
def saved_bytes():
    """Count the bytes autograd keeps for backward (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def checkpoint_child(mode: str, timed_steps: int) -> dict:
    """One checkpointing mode in this (fresh) process: time, saved bytes, peak RSS growth."""
    layers, h, heads, seq, batch = 12, 256, 4, 512, 8
    step = make_step("megatron-lite", "fp32", layers, h, heads, seq, batch, mode)
    step()  # allocates AdamW state and warms up
    with open("/proc/self/statm") as f:
        rss0 = int(f.read().split()[1]) * resource.getpagesize()
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    model, loss_fn = build("megatron-lite", layers, h, heads, seq, mode)
    ids = torch.randint(0, VOCAB, (batch, seq))
    with saved_bytes() as total:
        loss = loss_fn(ids, ids)
    del loss
    return {"mode": mode, "step_s": statistics.median(times), "saved_mib": total[0] / 2**20,
            "peak_growth_mib": peak / 2**20}


def checkpoint_table(timed_steps: int) -> list[dict]:
    rows = []
    for mode in ("none", "selective", "full"):
        out = subprocess.run([sys.executable, __file__, "--ckpt-child", mode,
                              "--steps", str(timed_steps)], check=True, capture_output=True,
                             text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 7")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--table", choices=("all", "throughput", "checkpoint"), default="all")
    parser.add_argument("--ckpt-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 7)
    if args.ckpt_child:
        print(json.dumps(checkpoint_child(args.ckpt_child, steps)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; median of {steps} steps\n")
    if args.table in ("all", "throughput"):
        print_throughput(steps)
    if args.table in ("all", "checkpoint"):
        print_checkpointing(steps)


def print_throughput(steps: int) -> None:
    print("GPT-2 6L h256 4 heads, seq 256, batch 8, vocab 50257: fwd + bwd + AdamW")
    print(f"{'precision':<10}{'implementation':<23}{'step s':>8}{'tokens/s':>10}"
          f"{'GFLOP/s':>9}{'vs eager':>10}{'vs plain':>10}{'vs HF':>7}")
    rows = throughput_table(steps)
    for r in rows:
        peers = {x["impl"]: x["tokens_per_s"] for x in rows if x["precision"] == r["precision"]}
        tps = r["tokens_per_s"]
        print(f"{r['precision']:<10}{r['impl']:<23}{r['step_s']:>8.3f}{tps:>10.0f}"
              f"{r['gflops']:>9.1f}{tps / peers['megatron-lite']:>9.2f}x"
              f"{tps / peers['plain']:>9.2f}x{tps / peers['transformers']:>6.2f}x")



def print_checkpointing(steps: int) -> None:
    print("\nActivation checkpointing, megatron-lite 12L h256, seq 512, batch 8, fp32")
    print(f"{'mode':<11}{'step s':>8}{'x none':>8}{'saved MiB':>11}{'x none':>8}"
          f"{'peak growth MiB':>17}")
    rows = checkpoint_table(max(2, steps // 2))
    base = rows[0]
    for r in rows:
        print(f"{r['mode']:<11}{r['step_s']:>8.3f}{r['step_s'] / base['step_s']:>7.2f}x"
              f"{r['saved_mib']:>11.0f}{r['saved_mib'] / base['saved_mib']:>7.2f}x"
              f"{r['peak_growth_mib']:>17.0f}")


if __name__ == "__main__":
    main()
