"""Pipeline x sequence parallelism: the point-to-point bytes a stage sends, measured,
against the planner's figure.

    python bench/pipeline_sp.py               # CPU, gloo, TP=2 x PP=2 = 4 processes
    python bench/pipeline_sp.py --hidden 512 --seq 256

Runs a few optimizer steps' forward and backward (``Schedule1F1B`` through
:class:`megatron_lite.training.pipeline.PipelineEngine`) of the same GPT at TP=2 x PP=2,
without and with ``parallel.sequence_parallel``, and counts the bytes of every send and
receive a rank posts in torch.distributed.pipelining (its ``_batch_p2p``: activations
forward, their gradients backward; not the first step's shape metadata), the planner's
"point-to-point bytes per step per rank". Megatron's way, the
stage boundary carries each TP rank's ``[b, s/TP, h]`` shard, so the bytes divide by TP;
the planner's ``p2p_bytes_per_step`` (:func:`megatron_lite.plan.plan`) is printed beside
them, and the step time of each (fastest of ``--steps`` after one; on a shared CPU a
rough figure: the gloo transfers of these small shapes are a small part of a step).
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
from torch.distributed.pipelining import schedules

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lite.config import load_config  # noqa: E402
from megatron_lite.parallel import destroy_parallel, init_parallel  # noqa: E402
from megatron_lite.plan import plan  # noqa: E402
from megatron_lite.training.pipeline import PipelineEngine, build_pipeline_model  # noqa: E402

TP, PP = 2, 2


def config(args, sp: bool):
    over = {"model.num_layers": args.layers, "model.hidden_size": args.hidden,
            "model.num_attention_heads": 8, "model.seq_length": args.seq,
            "model.max_position_embeddings": args.seq, "model.vocab_size": 512,
            "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
            "train.micro_batch_size": args.micro_batch,
            "train.global_batch_size": args.micro_batch * args.micro_batches,
            "parallel.pipeline_parallel_size": PP, "parallel.tensor_parallel_size": TP,
            "parallel.sequence_parallel": sp}
    return load_config(None, [f"{k}={val}" for k, val in over.items()])


def measure(ctx, args, sp: bool) -> tuple[float, float]:
    """(bytes this rank sent and received per step, fastest step seconds)."""
    cfg = config(args, sp)
    ctx.sequence_parallel.enabled = sp
    ctx.seed(1234)
    model = build_pipeline_model(cfg, cfg.model, ctx, device=ctx.device)
    model.train()
    m = args.micro_batches
    engine = PipelineEngine(model, cfg, ctx, m)
    g = torch.Generator().manual_seed(0)
    data = [{k: torch.randint(0, 512, (args.micro_batch, args.seq), generator=g)
             for k in ("input_ids", "labels")} for _ in range(m)]
    sent = [0]
    inner = schedules._batch_p2p

    def counted(ops, desc=None):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
        return inner(ops, desc)

    schedules._batch_p2p = counted
    try:
        engine.step(data)  # the first step: shape inference, warm-up
        model.zero_grad(set_to_none=True)
        sent[0] = 0
        steps = []
        for _ in range(args.steps):
            torch.distributed.barrier()
            tick = time.perf_counter()
            engine.step(data)
            steps.append(time.perf_counter() - tick)
            model.zero_grad(set_to_none=True)
    finally:
        schedules._batch_p2p = inner
    return sent[0] / args.steps, min(steps)


def worker(rank: int, port: int, args, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(TP * PP), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_parallel(TP, pipeline_parallel_size=PP, backend="gloo")
    try:
        for sp in (False, True):
            sent, step = measure(ctx, args, sp)
            figures = torch.tensor([sent, step], dtype=torch.float64)
            gathered = [torch.zeros_like(figures) for _ in range(TP * PP)]
            torch.distributed.all_gather(gathered, figures)
            if rank == 0:
                out[sp] = [g.tolist() for g in gathered]
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch "
          f"{args.micro_batch} x {args.micro_batches}; TP={TP} x PP={PP}, CPU gloo, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(port, args, out), nprocs=TP * PP)
        out = dict(out)
    base = None
    for sp in (False, True):
        ranks = out[sp]
        sent = max(r[0] for r in ranks)
        step = max(r[1] for r in ranks)
        with torch.device("meta"):
            planned = plan(config(args, sp), TP, 1, "h100", pp=PP)["p2p_bytes_per_step"]
        base = base or sent
        print(f"sequence_parallel={str(sp).lower():<5}: sent + received {sent / 2**20:7.3f} MiB "
              f"per step per rank (max over ranks; {sent / base:.2f} x without), planner "
              f"{planned / 2**20:7.3f} MiB; step {step * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
