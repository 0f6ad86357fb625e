"""Per-rank memory and step time of the DDP engine against DeepSpeed ZeRO-1 and ZeRO-2.

    python bench/zero.py             # GPT 8L h1024 (109M parameters), DP=2 (~2.5 min here)
    python bench/zero.py --dp 4      # more ranks: ZeRO's share of the state shrinks as 1/DP

Each engine trains the same model for a few steps on two (or --dp) gloo processes over a
random-token shard. Reported per rank: the median step time, and the growth of RSS from
just before the trainer is built, at the end of training (what the run holds: weights,
gradients, fp32 masters, Adam moments, buffers) and at its peak (which includes
DeepSpeed's transient copies while it flattens the model). Expected steady state in
fp32: DDP 20 B/param (4 weight + 4 gradient + 4 bucket + 8 Adam), ZeRO-1/2 about
4 + 4 + 12/DP (a fp32 master and the Adam moments partitioned; ZeRO-2 also partitions
the reduced gradients but keeps a reduction bucket).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_lite.config import load_config  # noqa: E402
from megatron_lite.data.indexed import IndexedDatasetWriter  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

VOCAB = 8192


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def random_shard(prefix: Path) -> Path:
    """200 documents of 1000 random token ids below VOCAB (timing needs no real text)."""
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(prefix)
    for _ in range(200):
        writer.add_document([rng.integers(0, VOCAB, 1000)])
    writer.finalize()
    return prefix


def _worker(ctx, overrides, out_dir):
    from megatron_lite.training.trainer import Trainer

    if "deepspeed" in " ".join(overrides):
        from megatron_lite.training.zero import import_deepspeed

        import_deepspeed(ctx.device)  # imported before the baseline, like torch
    base = rss_mib()
    trainer = Trainer(load_config(None, overrides), ctx)
    times = []
    for _ in range(trainer.cfg.train.max_steps):
        tick = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - tick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in trainer.model.parameters())
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps({
        "step_s": statistics.median(times[1:]), "end_mib": rss_mib() - base,
        "peak_mib": peak - base, "params": params}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--engines", nargs="+", default=["ddp", "zero-1", "zero-2"],
                    choices=["ddp", "zero-1", "zero-2"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides for every engine (parallel.ddp_bucket_mb=100, ...)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = random_shard(Path(tmp) / "random")
        common = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                  "model.num_attention_heads=8", "model.seq_length=128",
                  "model.max_position_embeddings=128", f"model.vocab_size={VOCAB}",
                  "model.hidden_dropout=0", "model.attention_dropout=0",
                  "train.micro_batch_size=2", f"train.global_batch_size={2 * args.dp}",
                  f"train.max_steps={args.steps + 1}", "train.eval_interval=0",
                  f"data.data_path={prefix}", "log.tensorboard=false",
                  f"train.run_dir={tmp}/run"]
        engines = {"ddp": [], "zero-1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
                   "zero-2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"]}
        print(f"GPT {args.layers}L h{args.hidden}, vocab {VOCAB}, seq 128, micro-batch 2, "
              f"fp32, TP=1 x DP={args.dp}, {args.steps} timed steps, 1 thread per rank")
        print(f"{'engine':8} {'step s':>7}   RSS growth MiB/rank: {'end':>5} {'x ddp':>6} "
              f"{'peak':>6} {'x ddp':>6}")
        ddp = None
        if args.set:
            print(f"with {' '.join(args.set)}")
        for name, extra in ((n, engines[n] + args.set) for n in args.engines):
            out = Path(tmp) / name
            out.mkdir()
            run_distributed(_worker, args.dp, common + extra, str(out), tp_size=1)
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            step = statistics.median(r["step_s"] for r in ranks)
            end = max(r["end_mib"] for r in ranks)
            peak = max(r["peak_mib"] for r in ranks)
            ddp = ddp or (end, peak)  # the first engine listed is the reference
            print(f"{name:8} {step:7.3f} {'':21}{end:5.0f} {end / ddp[0]:5.2f}x {peak:6.0f} "
                  f"{peak / ddp[1]:5.2f}x", flush=True)
        params = ranks[0]["params"]
        print(f"({params / 1e6:.1f}M parameters: 20 B/param = {20 * params / 2**20:.0f} MiB, "
              f"4 + 4 + 12/{args.dp} B/param = {(8 + 12 / args.dp) * params / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
