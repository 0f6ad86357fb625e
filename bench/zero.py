"""Per-rank memory and step time of the DDP engine against the distributed optimizer
(``parallel.distributed_optimizer=true``) and DeepSpeed ZeRO-1 and ZeRO-2.

    python bench/zero.py             # GPT 8L h1024 (109M parameters), DP=2 (~3.5 min here)
    python bench/zero.py --engines ddp distopt --set train.precision=bf16 train.params_dtype=bf16
    python bench/zero.py --dp 4      # more ranks: ZeRO's share of the state shrinks as 1/DP
    python bench/zero.py --breakdown # also one step's phases, memory copies and collectives

Each engine trains the same model for a few steps on two (or --dp) gloo processes over a
random-token shard. Reported per rank: the median step time, the median CPU time of a
step (every thread of the rank: compute and gloo's transfers, no waiting; the fairer
figure when other jobs share the machine), and the growth of RSS from
just before the trainer is built, at the end of training (what the run holds: weights,
gradients, fp32 masters, Adam moments, buffers) and at its peak (which includes
DeepSpeed's transient copies while it flattens the model), and the optimizer state the
rank holds (Adam moments, and fp32 masters where they are separate from the weights).
Expected steady state in fp32: DDP 20 B/param (4 weight + 4 gradient + 4 bucket + 8
Adam), the distributed optimizer 8 + 8/DP (the weights are the masters; the gradient
buffer is reduce-scattered in place), ZeRO-1/2 about 4 + 4 + 12/DP (a fp32 master and
the Adam moments partitioned; ZeRO-2 also partitions the reduced gradients but keeps a
reduction bucket).
"""

from __future__ import annotations

import argparse
import contextlib
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


COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter",
               "_reduce_scatter", "broadcast", "reduce_")
COPIES = ("aten::copy_", "aten::cat")  # gradients into flat buffers, buckets, partitions


def _timed(phases: dict, name: str, fn):
    """``fn``, adding its wall time to ``phases[name]``."""
    def wrapper(*args, **kwargs):
        tick = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - tick
    return wrapper


def _instrument(trainer) -> dict:
    """Time the step's phases: forward, backward (under DDP its overlapped all-reduces;
    under ZeRO DeepSpeed's gradient reduction, which runs in backward hooks and at its
    end), and the optimizer step (under ZeRO: the partition's Adam and the all-gather of
    the updated weights; the distributed optimizer: its slices' Adam and the all-gather).
    Under DDP and the distributed optimizer, backward is the step minus the other two
    (with its overlapped all-reduces or reduce-scatters and their wait)."""
    phases: dict = {}
    trainer._forward = _timed(phases, "forward", trainer._forward)
    if trainer.zero is not None:
        trainer.zero.backward = _timed(phases, "backward", trainer.zero.backward)
        trainer.zero.step = _timed(phases, "step", trainer.zero.step)
    elif trainer.distopt is not None:  # Adam on the slices and their all-gather
        trainer.distopt.step = _timed(phases, "step", trainer.distopt.step)
    else:
        trainer.optimizer.step = _timed(phases, "step", trainer.optimizer.step)
    return phases


def optimizer_bytes(trainer) -> int:
    """The optimizer state this rank holds: Adam's tensors, plus fp32 masters kept apart
    from the weights (DeepSpeed's partitions, the distributed optimizer's bf16 case)."""
    base = trainer.zero.base if trainer.zero is not None else trainer.optimizer
    total = sum(v.numel() * v.element_size() for s in base.state.values()
                for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    if trainer.zero is not None:
        total += sum(f.numel() * f.element_size() for f, _, _ in
                     trainer.zero.internals.partitions())
    elif trainer.distopt is not None:
        total += trainer.distopt.state_bytes()["masters"]
    elif trainer.mixed is not None:
        total += sum(m.numel() * 4 for m in trainer.mixed.masters)
    return total


def _worker(ctx, overrides, out_dir, breakdown=False):
    from megatron_lite.training.trainer import Trainer

    if "deepspeed" in " ".join(overrides):
        from megatron_lite.training.zero import import_deepspeed

        import_deepspeed(ctx.device)  # imported before the baseline, like torch
    base = rss_mib()
    trainer = Trainer(load_config(None, overrides), ctx)
    times, cpu, per_step, comm = [], [], [], {}
    last = trainer.cfg.train.max_steps - 1
    for i in range(last + 1):
        # --breakdown: one more step after the timed ones, instrumented and profiled
        phases = _instrument(trainer) if breakdown and i == last else None
        profile = torch.profiler.profile() if phases is not None else contextlib.nullcontext()
        with profile as prof:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            trainer.train_step()
            took = time.perf_counter() - tick
        if phases is None:
            times.append(took)
            cpu.append(time.process_time() - cpu_tick)
            continue
        if trainer.zero is None:
            phases["backward"] = took - phases["forward"] - phases["step"]
        per_step.append({k: phases[k] for k in ("forward", "backward", "step")})
        events = prof.key_averages()
        per_step[-1]["copies"] = sum(e.self_cpu_time_total for e in events
                                     if e.key in COPIES) / 1e6
        for e in events:
            if any(c in e.key.lower() for c in COLLECTIVES) and "::" in e.key:
                comm[e.key] = {"calls": e.count, "s": e.cpu_time_total / 1e6}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in trainer.model.parameters())
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps({
        "step_s": statistics.median(times[1:]), "cpu_s": statistics.median(cpu[1:]),
        "end_mib": rss_mib() - base,
        "peak_mib": peak - base, "params": params, "phases": per_step, "comm": comm,
        "optim_mib": optimizer_bytes(trainer) / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--engines", nargs="+", default=["ddp", "distopt", "zero-1", "zero-2"],
                    choices=["ddp", "distopt", "zero-1", "zero-2"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides for every engine (parallel.ddp_bucket_mb=100, ...)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time one step's phases and the collectives in it (rank 0)")
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
                  f"train.max_steps={args.steps + 1 + args.breakdown}", "train.eval_interval=0",
                  f"data.data_path={prefix}", "log.tensorboard=false",
                  f"train.run_dir={tmp}/run"]
        engines = {"ddp": [], "distopt": ["parallel.distributed_optimizer=true"],
                   "zero-1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
                   "zero-2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"]}
        print(f"GPT {args.layers}L h{args.hidden}, vocab {VOCAB}, seq 128, micro-batch 2, "
              f"fp32 unless --set, TP=1 x DP={args.dp}, {args.steps} timed steps, 1 thread/rank")
        print(f"{'engine':8} {'step s':>7} {'x ddp':>6} {'cpu s':>6} {'x ddp':>6}   "
              f"RSS growth MiB/rank: {'end':>5} {'x ddp':>6} {'peak':>6} {'x ddp':>6}   "
              f"optimizer MiB/rank {'x ddp':>6}")
        ddp, breakdown = None, {}
        if args.set:
            print(f"with {' '.join(args.set)}")
        for name, extra in ((n, engines[n] + args.set) for n in args.engines):
            out = Path(tmp) / name
            out.mkdir()
            run_distributed(_worker, args.dp, common + extra, str(out), args.breakdown,
                            tp_size=1)
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            breakdown[name] = ranks[0]
            step = statistics.median(r["step_s"] for r in ranks)
            end = max(r["end_mib"] for r in ranks)
            peak = max(r["peak_mib"] for r in ranks)
            optim = max(r["optim_mib"] for r in ranks)
            cpu = statistics.median(r["cpu_s"] for r in ranks)
            ddp = ddp or (end, peak, step, optim, cpu)  # the first engine listed: reference
            print(f"{name:8} {step:7.3f} {step / ddp[2]:5.2f}x {cpu:6.2f} {cpu / ddp[4]:5.2f}x"
                  f" {'':21}{end:5.0f} "
                  f"{end / ddp[0]:5.2f}x {peak:6.0f} {peak / ddp[1]:5.2f}x   {optim:18.0f} "
                  f"{optim / ddp[3]:5.2f}x", flush=True)
        params = ranks[0]["params"]
        print(f"({params / 1e6:.1f}M parameters: 20 B/param = {20 * params / 2**20:.0f} MiB, "
              f"8 + 8/{args.dp} B/param = {(8 + 8 / args.dp) * params / 2**20:.0f} MiB, "
              f"4 + 4 + 12/{args.dp} B/param = {(8 + 12 / args.dp) * params / 2**20:.0f} MiB)")
        if args.breakdown:
            print_breakdown(breakdown)


def print_breakdown(ranks: dict) -> None:
    """One step of rank 0 per engine: phase times, the time of memory copies in the step
    (``aten::copy_`` and ``aten::cat`` self time, wherever they run), then each
    collective's calls and the profiler's CPU time of its op (on gloo that is the
    enqueue; the transfer runs on gloo's own threads, so a wait shows in the phases)."""
    print("\none more step's phases on rank 0, s (the profiler on: a little slower than above)")
    print(f"{'engine':8} {'forward':>8} {'backward':>9} {'opt step':>9} {'copies':>7}   "
          "collectives (calls, s)")
    for name, r in ranks.items():
        ph = r["phases"][0]
        comm = ", ".join(f"{k.split('::')[-1]} {v['calls']}x {v['s']:.2f}"
                         for k, v in sorted(r["comm"].items(), key=lambda kv: -kv[1]["s"]))
        print(f"{name:8} {ph['forward']:8.2f} {ph['backward']:9.2f} {ph['step']:9.2f} "
              f"{ph['copies']:7.2f}   {comm or '-'}")


if __name__ == "__main__":
    main()
