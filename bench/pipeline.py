"""Pipeline parallelism: the measured bubble against theory, and PP=2 against TP=2.

    python bench/pipeline.py                  # CPU, gloo, 2 processes of one thread each
    python bench/pipeline.py --hidden 512 --steps 5
    python bench/pipeline.py --cuda ...       # 2 GPUs, NCCL (bench/gpu_check.sh's PP row)

For P = 2 stages and m = 2, 4, 8 micro-batches per step (``Schedule1F1B`` of
torch.distributed.pipelining through :class:`megatron_lite.training.pipeline.PipelineEngine`),
each stage's *busy* time is the time spent inside its stage's forward and backward
computations (``PipelineStage.forward_one_chunk`` / ``backward_one_chunk``, timed on the
stage itself); its bubble is ``1 - busy / step``, the share of the step it waited. The
theory is ``(P - 1) / (m + P - 1)`` (Narayanan et al. 2021), ``(P - 1) / (V m + P - 1)``
interleaved with V chunks per stage. Then the step time (forward and backward of the same
m micro-batches) of the same model at PP=2 and at TP=2. Each figure is the fastest of
``--steps`` steps after a warm-up step (the least disturbed by other processes). The
layers are even; the loss's head is small next to them (vocab 512).
The host's load average is printed: on a shared CPU the other processes' time lands in
the measured bubble (a stage waits for a peer that was descheduled).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lite.config import load_config  # noqa: E402
from megatron_lite.models import build_model  # noqa: E402
from megatron_lite.parallel import destroy_parallel, init_parallel  # noqa: E402
from megatron_lite.training.pipeline import PipelineEngine, build_pipeline_model  # noqa: E402


def config(args, pp: int, tp: int, m: int, schedule: str = "1f1b", v: int = 1):
    over = {"model.num_layers": args.layers, "model.hidden_size": args.hidden,
            "model.num_attention_heads": 8, "model.seq_length": args.seq,
            "model.max_position_embeddings": args.seq, "model.vocab_size": 512,
            "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
            "train.micro_batch_size": args.micro_batch,
            "train.global_batch_size": args.micro_batch * m,
            "parallel.pipeline_parallel_size": pp, "parallel.tensor_parallel_size": tp,
            "parallel.pipeline_schedule": schedule, "parallel.virtual_pipeline_size": v}
    return load_config(None, [f"{k}={val}" for k, val in over.items()])


def batches(args, m: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{k: torch.randint(0, 512, (args.micro_batch, args.seq), generator=g).to(device)
             for k in ("input_ids", "labels")} for _ in range(m)]


def sync(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def time_pipeline(ctx, args, m: int, schedule: str, v: int) -> tuple[float, float]:
    """(step seconds, bubble share) of this stage's fastest step (the least disturbed by
    other processes on a shared host)."""
    cfg = config(args, 2, 1, m, schedule, v)
    ctx.seed(1234)
    model = build_pipeline_model(cfg, cfg.model, ctx, device=ctx.device)
    model.train()
    engine = PipelineEngine(model, cfg, ctx, m)
    busy = [0.0]
    for stage in engine.stages:
        for name in ("forward_one_chunk", "backward_one_chunk"):
            inner = getattr(stage, name)

            def timed(*a, _inner=inner, **kw):
                sync(ctx)
                tick = time.perf_counter()
                try:
                    return _inner(*a, **kw)
                finally:
                    sync(ctx)
                    busy[0] += time.perf_counter() - tick
            setattr(stage, name, timed)
    data = batches(args, m, ctx.device)
    steps, bubbles = [], []
    for i in range(args.steps + 1):
        busy[0] = 0.0
        torch.distributed.barrier()
        sync(ctx)
        tick = time.perf_counter()
        engine.step(data)
        sync(ctx)
        step = time.perf_counter() - tick
        model.zero_grad(set_to_none=True)
        if i:
            steps.append(step)
            bubbles.append(1 - busy[0] / step)
    best = min(range(len(steps)), key=steps.__getitem__)
    return steps[best], bubbles[best]


def time_tp(ctx, args, m: int) -> float:
    cfg = config(args, 1, 2, m)
    ctx.seed(1234)
    model = build_model(cfg.model, ctx, device=ctx.device)
    model.train()
    data = batches(args, m, ctx.device)
    steps = []
    for _ in range(args.steps + 1):
        torch.distributed.barrier()
        sync(ctx)
        tick = time.perf_counter()
        for b in data:
            (model(**b) / m).backward()
        sync(ctx)
        steps.append(time.perf_counter() - tick)
        model.zero_grad(set_to_none=True)
    return min(steps[1:])


def worker(rank: int, port: int, args, kind: str, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not args.cuda:
        torch.set_num_threads(1)
    pp, tp = (2, 1) if kind == "pp" else (1, 2)
    ctx = init_parallel(tp, pipeline_parallel_size=pp, backend=None if args.cuda else "gloo")
    try:
        if kind == "pp":
            for schedule, v in (("1f1b", 1), ("interleaved_1f1b", 2)):
                for m in args.micro_batches:
                    step, bubble = time_pipeline(ctx, args, m, schedule, v)
                    # every stage's bubble, the step of the slowest
                    both = torch.tensor([bubble, step], dtype=torch.float64,
                                        device=ctx.device)
                    gathered = [torch.zeros_like(both) for _ in range(2)]
                    torch.distributed.all_gather(gathered, both)
                    if rank == 0:
                        out[(schedule, m)] = [g.cpu().tolist() for g in gathered]
        else:
            for m in args.micro_batches:
                step = torch.tensor(time_tp(ctx, args, m), device=ctx.device)
                torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
                if rank == 0:
                    out[("tp2", m)] = float(step.cpu())
    finally:
        destroy_parallel()


def run(kind: str, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(port, args, kind, out), nprocs=2)
        return dict(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cuda", action="store_true", help="2 GPUs and NCCL instead of the CPU")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    where = "2 GPUs, NCCL" if args.cuda else \
        f"CPU gloo, 2 processes x 1 thread, load average {os.getloadavg()[0]:.1f} on " \
        f"{os.cpu_count()} cores"
    print(f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch "
          f"{args.micro_batch}; {where}; fastest of {args.steps} steps (forward + backward) "
          "after 1", flush=True)
    pp = run("pp", args)
    tp = run("tp", args)
    report(pp, tp, args)
    return 0


def report(pp: dict, tp: dict, args) -> None:
    p = 2
    print(f"{'schedule':<18}{'m':>3}{'bubble stage0':>15}{'stage1':>8}{'mean':>7}"
          f"{'theory':>8}{'off by':>8}{'step ms':>9}")
    worst_m8 = None
    for schedule, v in (("1f1b", 1), ("interleaved_1f1b", 2)):
        for m in args.micro_batches:
            (b0, s0), (b1, s1) = pp[(schedule, m)]
            mean = (b0 + b1) / 2
            theory = (p - 1) / (v * m + p - 1)
            off = (mean - theory) / theory
            if schedule == "1f1b" and m == 8:
                worst_m8 = off
            print(f"{schedule:<18}{m:>3}{b0:>15.3f}{b1:>8.3f}{mean:>7.3f}{theory:>8.3f}"
                  f"{off:>+8.0%}{max(s0, s1) * 1e3:>9.1f}")
    for m in args.micro_batches:
        one = pp[("1f1b", m)]
        inter = pp[("interleaved_1f1b", m)]
        ratio = (inter[0][0] + inter[1][0]) / (one[0][0] + one[1][0])
        step_pp = max(one[0][1], one[1][1])
        print(f"m={m}: interleaved V=2 bubble / 1F1B bubble {ratio:.2f} (theory "
              f"{(m + 1) / (2 * m + 1):.2f}); step PP=2 "
              f"{step_pp * 1e3:.1f} ms vs TP=2 {tp[('tp2', m)] * 1e3:.1f} ms "
              f"(PP/TP {step_pp / tp[('tp2', m)]:.2f})")
    if worst_m8 is not None:
        print(f"1F1B m=8: measured bubble {worst_m8:+.0%} off theory (goal: within 25 %)")


if __name__ == "__main__":
    sys.exit(main())
