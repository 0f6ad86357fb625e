"""GPU readiness check: MFU, tokens/s and peak memory of the GPT-2 configs on one GPU.

    bash bench/gpu_check.sh                          # one H100/H200-class GPU, <= 8 minutes
    python bench/gpu_check.py --cpu --tiny           # the same code on tiny shapes (CI)
    python bench/gpu_check.py --configs 124m --variants eager compile

For each of configs/gpt2/{124m,355m,1.5b}.yaml at TP=1, bf16 (``train.precision=bf16``
with ``train.params_dtype=bf16``, Megatron's mixed precision; causal attention through
SDPA, which picks flash attention on the GPU), five variants: eager, ``train.compile``,
both again with full activation checkpointing, and eager under the distributed optimizer
(``parallel.distributed_optimizer=true``: at DP=1 its buffers, hooks and slice step
against the eager row's DDP-less bf16 engine; no sharding to win on one GPU). Each row is
a real :class:`Trainer` on a random-token shard, one micro-batch per step: the median of
the timed steps after the warm-up (compilation) ones; MFU is the model FLOPs of a step
(Narayanan et al. 2021, recomputation not counted) over the step time and the device's
dense bf16 peak from :data:`megatron_lite.devices.DEVICES`; peak memory is
``torch.cuda.max_memory_allocated`` over the row, next to what ``python -m
megatron_lite.plan`` predicts for it.

With two or more GPUs it also times the TP=2 all-reduce of one layer's activation
``[micro-batch, seq, hidden]`` in bf16 on two NCCL processes and the share of a step
that Megatron's four per layer would take, trains the first config at TP=2 (eager)
without and with ``parallel.sequence_parallel`` (step time and peak memory of rank 0,
and the planner's figure for each), and (GPUs only) a PP row: a 24-layer, hidden-1024
GPT at PP=2 (1F1B, 8 micro-batches) against TP=2, its measured bubble against
``(P - 1) / (m + P - 1)`` (``bench/pipeline.py``). ``--budget-s`` stops before a row
that would start after it (a slow first GPU still reports the rows it finished).
``--cpu --tiny`` runs every step of this (but the PP row) on the CPU (gloo for the
all-reduce) on 2-layer, hidden-64 shapes so the check cannot rot between GPUs.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lite.config import load_config  # noqa: E402
from megatron_lite.data.indexed import IndexedDatasetWriter  # noqa: E402
from megatron_lite.devices import DEVICES  # noqa: E402
from megatron_lite.parallel import init_parallel  # noqa: E402
from megatron_lite.plan import plan  # noqa: E402
from megatron_lite.training.metrics import model_flops_per_step, peak_flops  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import pipeline as bench_pipeline  # noqa: E402 (bench/pipeline.py)

CONFIGS = ("124m", "355m", "1.5b")
# name -> (train.compile, model.activation_checkpointing, parallel.distributed_optimizer)
VARIANTS = {"eager": (False, "none", False), "compile": (True, "none", False),
            "eager+ckpt": (False, "full", False), "compile+ckpt": (True, "full", False),
            "eager+distopt": (False, "none", True)}
MICRO_BATCH = {"124m": 8, "355m": 8, "1.5b": 2}  # 1.5b: fits 80 GB without checkpointing
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.seq_length=64", "model.max_position_embeddings=64", "model.vocab_size=512"]


def random_shard(prefix: Path, vocab: int, tokens: int) -> Path:
    """Documents of 1000 random token ids below ``vocab`` (timing needs no real text)."""
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(prefix)
    for _ in range(max(tokens // 1000, 4)):
        writer.add_document([rng.integers(0, vocab, 1000)])
    writer.finalize()
    return prefix


def overrides_for(name: str, variant: str, args, shard: Path, run_dir: Path) -> list[str]:
    compile_, ckpt, distopt = VARIANTS[variant]
    mb = 2 if args.tiny else MICRO_BATCH[name]
    return [
        *(TINY if args.tiny else []),
        "parallel.tensor_parallel_size=1", f"model.activation_checkpointing={ckpt}",
        f"parallel.distributed_optimizer={str(distopt).lower()}",
        f"train.compile={str(compile_).lower()}",
        "train.precision=bf16", "train.params_dtype=bf16",
        f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}",
        f"train.max_steps={args.warmup + args.steps}", "train.eval_interval=0",
        f"data.data_path={shard}", "log.tensorboard=false", f"train.run_dir={run_dir}",
    ]


def measure(cfg_path: Path, overrides: list[str], ctx, warmup: int, steps: int,
            tp: int = 1) -> dict:
    """One row: build a Trainer, run ``warmup`` then ``steps`` timed optimizer steps."""
    from megatron_lite.training.trainer import Trainer

    cuda = ctx.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # each row compiles its own model from scratch
    cfg = load_config(cfg_path, overrides)
    predicted = plan(cfg, tp, 1, "h100" if cuda else "cpu")["memory_per_rank"]["total"]
    trainer = Trainer(cfg, ctx)
    tick = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    sync()
    first = time.perf_counter() - tick
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        loss = float(trainer.train_step()["loss"])  # .item(): waits for the step
        sync()
        times.append(time.perf_counter() - tick)
    m, t = trainer.cfg.model, trainer.cfg.train
    step_s = statistics.median(times)
    flops = model_flops_per_step(m, t.global_batch_size, m.seq_length)
    peak = peak_flops(ctx.device, "bf16") if cuda else DEVICES["cpu"].bf16
    row = {"layers": m.num_layers, "step_s": step_s,
           "params": sum(p.numel() for p in trainer.model.parameters()),
           "tokens_per_s": t.global_batch_size * m.seq_length / step_s,
           "mfu": flops / step_s / peak if peak else None, "warmup_s": first, "loss": loss,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "planned_gib": predicted / 2**30}
    del trainer
    gc.collect()
    return row


def _allreduce_worker(rank: int, port: int, backend: str, shapes: list, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2)
    try:
        for name, shape in shapes:
            x = torch.randn(shape, dtype=torch.bfloat16, device=device)
            times = []
            for i in range(25):
                if backend == "nccl":
                    torch.cuda.synchronize()
                tick = time.perf_counter()
                dist.all_reduce(x)
                if backend == "nccl":
                    torch.cuda.synchronize()
                if i >= 5:  # the first ones set up the communicator
                    times.append(time.perf_counter() - tick)
            if rank == 0:
                out[name] = statistics.median(times)
    finally:
        dist.destroy_process_group()


def tp2_allreduce(shapes: list, backend: str) -> dict:
    """Median seconds of one bf16 all-reduce per shape, between two processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_allreduce_worker, args=(port, backend, shapes, out), nprocs=2)
        return dict(out)


def _sp_worker(rank: int, port: int, backend: str, cfg_path: Path, runs: list, args,
               out: dict) -> None:
    """Rank ``rank`` of a TP=2 job: each of ``runs`` (name, overrides) trained, timed."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = init_parallel(2, backend=backend)
    try:
        for name, overrides in runs:
            cfg = load_config(cfg_path, overrides)
            planned = plan(cfg, 2, 1, "h100" if backend == "nccl" else "cpu")
            r = measure(cfg_path, overrides, ctx, args.warmup, args.steps, tp=2)
            if rank == 0:
                out[name] = {**r, "planned_gib": planned["memory_per_rank"]["total"] / 2**30}
    finally:
        dist.destroy_process_group()


def tp2_sequence_parallel(cfg_name: str, args, shard: Path, tmp: Path) -> dict:
    """``{"plain": row, "sequence-parallel": row}`` of ``cfg_name`` trained at TP=2."""
    runs = []
    for name, sp in (("plain", False), ("sequence-parallel", True)):
        over = overrides_for(cfg_name, "eager", args, shard, tmp / f"tp2-{name}")
        over = [o for o in over if not o.startswith("parallel.tensor_parallel_size=")]
        runs.append((name, over + ["parallel.tensor_parallel_size=2",
                                   f"parallel.sequence_parallel={str(sp).lower()}"]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sp_worker, args=(port, "gloo" if args.cpu else "nccl",
                                   ROOT / "configs" / "gpt2" / f"{cfg_name}.yaml", runs, args,
                                   out), nprocs=2)
        return dict(out)


def significant(x: float, digits: int = 4) -> str:
    """``x`` in positional notation with ``digits`` significant digits (0.009123 ->
    '0.009123', 1234.5 -> '1234', 12.345 -> '12.35'): a printed step time keeps the same
    relative precision however fast the step, so tokens/s and MFU recompute from it."""
    if x <= 0 or not math.isfinite(x):
        return f"{x:.{digits}f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(x)))
    return f"{x:.{decimals}f}"


def format_row(cfg_name: str, variant: str, mb: int, r: dict) -> str:
    """One table row; the step time in milliseconds to 4 significant digits."""
    return (f"{cfg_name:<7}{variant:<14}{r['params'] / 1e6:>7.1f}M{mb:>12}"
            f"{significant(r['step_s'] * 1e3):>9}{r['tokens_per_s']:>10.0f}"
            f"{_fmt(r['mfu'], '.2f'):>7}{_fmt(r['peak_gib'], '.2f'):>10}"
            f"{r['planned_gib']:>9.2f}{r['warmup_s']:>11.1f}")


def pp_row() -> None:
    """PP=2 against TP=2 on two GPUs (bench/pipeline.py's measurement, one size)."""
    args = bench_pipeline.parser().parse_args(
        ["--cuda", "--layers", "24", "--hidden", "1024", "--seq", "1024", "--micro-batch",
         "4", "--micro-batches", "8", "--steps", "5"])
    pp = bench_pipeline.run("pp", args)
    tp = bench_pipeline.run("tp", args)
    (b0, s0), (b1, s1) = pp[("1f1b", 8)]
    (i0, _), (i1, _) = pp[("interleaved_1f1b", 8)]
    step_tp = tp[("tp2", 8)]
    print(f"PP=2 (1F1B, 8 micro-batches of 4 x 1024, 24 layers, hidden 1024, fp32): step "
          f"{max(s0, s1) * 1e3:.1f} ms vs TP=2 {step_tp * 1e3:.1f} ms; bubble "
          f"{(b0 + b1) / 2:.3f} (theory {1 / 9:.3f}), interleaved V=2 {(i0 + i1) / 2:.3f} "
          f"(theory {1 / 17:.3f})", flush=True)


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: CI)")
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-64 shapes")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no row after this many seconds")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu --tiny for the dry run", file=sys.stderr)
        return 2
    start = time.perf_counter()
    ctx = init_parallel(1, backend="gloo" if args.cpu else None, env={})
    if args.cpu:
        name = f"CPU ({os.cpu_count()} cores)"
    else:
        name = torch.cuda.get_device_name(ctx.device)
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops(ctx.device, "bf16") if not args.cpu else DEVICES["cpu"].bf16
    peak_text = "unknown device: no MFU" if peak is None else \
        f"{peak / 1e12:.0f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.0f} GFLOP/s"
    print(f"device: {name}, torch {torch.__version__}, bf16 peak {peak_text}; "
          f"median of {args.steps} "
          f"steps after {args.warmup}{'; tiny shapes' if args.tiny else ''}", flush=True)
    print(f"{'config':<7}{'variant':<14}{'params':>8}{'micro-batch':>12}{'step ms':>9}"
          f"{'tokens/s':>10}{'MFU':>7}{'peak GiB':>10}{'planned':>9}{'warm-up s':>11}",
          flush=True)
    rows, eager = 0, {}  # config -> (layers, eager step s), for the TP=2 share
    with tempfile.TemporaryDirectory() as tmp:
        vocab = 512 if args.tiny else 50257
        shard = random_shard(Path(tmp) / "random", vocab, 400_000 if not args.tiny else 4000)
        for cfg_name in args.configs:
            for variant in args.variants:
                if time.perf_counter() - start > args.budget_s:
                    print(f"{cfg_name:<7}{variant:<14} skipped: past --budget-s "
                          f"{args.budget_s:.0f}", flush=True)
                    continue
                overrides = overrides_for(cfg_name, variant, args, shard, Path(tmp) / "run")
                mb = int(overrides[[o.split("=")[0] for o in overrides]
                                   .index("train.micro_batch_size")].split("=")[1])
                try:
                    r = measure(ROOT / "configs" / "gpt2" / f"{cfg_name}.yaml", overrides,
                                ctx, args.warmup, args.steps)
                except torch.OutOfMemoryError:
                    gc.collect()
                    print(f"{cfg_name:<7}{variant:<14} out of memory", flush=True)
                    continue
                rows += 1
                if variant == "eager":
                    eager[cfg_name] = (r["layers"], r["step_s"])
                print(format_row(cfg_name, variant, mb, r), flush=True)
    gpus = torch.cuda.device_count() if not args.cpu else 0
    if args.cpu or gpus >= 2:
        h = {"124m": 768, "355m": 1024, "1.5b": 1600}
        shapes = [(n, (2, 64, 64) if args.tiny else (MICRO_BATCH[n], 1024, h[n]))
                  for n in args.configs]
        times = tp2_allreduce(shapes, "gloo" if args.cpu else "nccl")
        print("TP=2 all-reduce of one layer's activation (bf16), 2 processes:")
        for n, shape in shapes:
            mib = np.prod(shape) * 2 / 2**20
            share = ""
            if n in eager:  # Megatron's f and g: 2 forward + 2 backward per layer
                layers, step_s = eager[n]
                share = (f"; x {4 * layers} per step = {4 * layers * times[n] * 1e3:.1f} ms, "
                         f"{4 * layers * times[n] / step_s:.2f} of the TP=1 eager step")
            print(f"  {n:<6}[{', '.join(map(str, shape))}] {mib:6.1f} MiB: "
                  f"{significant(times[n] * 1e3):>8} ms{share}")
        if time.perf_counter() - start > args.budget_s:
            print(f"TP=2 sequence parallelism: skipped, past --budget-s {args.budget_s:.0f}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                name = args.configs[0]
                shard = random_shard(Path(tmp) / "random", 512 if args.tiny else 50257,
                                     400_000 if not args.tiny else 4000)
                sp = tp2_sequence_parallel(name, args, shard, Path(tmp))
            print(f"TP=2 sequence parallelism ({name}, eager, 2 processes, rank 0):")
            for variant, r in sp.items():
                print(f"  {variant:<18} step {significant(r['step_s'] * 1e3):>8} ms  peak "
                      f"{_fmt(r['peak_gib'], '.2f'):>6} GiB  planned {r['planned_gib']:.2f} GiB")
            if len(sp) == 2:
                a, b = sp["plain"], sp["sequence-parallel"]
                mem = "n/a" if a["peak_gib"] is None else f"{b['peak_gib'] / a['peak_gib']:.3f}"
                print(f"  sequence-parallel / plain: step {b['step_s'] / a['step_s']:.3f}, "
                      f"peak memory {mem}")
    else:
        print(f"TP=2 all-reduce and sequence parallelism: skipped ({gpus} "
              f"GPU{'s' if gpus != 1 else ''})")
    if gpus >= 2 and time.perf_counter() - start <= args.budget_s:
        pp_row()
    else:
        print(f"PP=2 row: skipped ({'--cpu' if args.cpu else f'{gpus} GPUs'}; 2 GPUs needed)")
    print(f"gpu_check: {rows} rows in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
