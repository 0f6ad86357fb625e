"""TP=2 step time and memory with the tensor-parallel all-reduces in place (Megatron's
way) against reducing a copy (what megatron-lite did before).

    python bench/tp_collectives.py            # GPT 6L h512, seq 256, micro-batch 4 (~2 min)

Each mode trains the same model on two gloo processes (TP=2, 1 thread each) in fresh
processes, twice, alternating; reported: the median step time, and per rank the growth
of peak RSS from just before the trainer is built. The copies the in-place path avoids:
per layer, one activation-sized tensor for each of the two forward all-reduces (after the
row-parallel attention output and FFN output) and one for each of the two backward ones
(the gradients entering the column-parallel QKV and FFN input); they are transient, so
the peak saves about one such tensor and the step saves 4 x layers copies.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zero import VOCAB, random_shard, rss_mib  # noqa: E402 (bench/zero.py)

from megatron_lite.config import load_config  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


def reduce_copies() -> None:
    """What megatron-lite did before: the TP all-reduces sum a copy of their input
    (forward and backward), nothing is marked dirty."""
    from megatron_lite.parallel import comm, mappings

    def copy_all_reduce(x, group):
        if mappings.group_size(group) == 1:
            return x
        return comm.all_reduce(x.contiguous().clone(), group)

    def reduce_forward(ctx, x, group):
        return copy_all_reduce(x, group)

    mappings._all_reduce = copy_all_reduce
    mappings._ReduceFromTPRegion.forward = staticmethod(reduce_forward)


def _worker(ctx, overrides, out_dir, inplace):
    from megatron_lite.training.trainer import Trainer

    if not inplace:
        reduce_copies()  # this process only (each run is its own processes)
    base = rss_mib()
    trainer = Trainer(load_config(None, overrides), ctx)
    times, losses = [], []
    for _ in range(trainer.cfg.train.max_steps):
        tick = time.perf_counter()
        losses.append(float(trainer.train_step()["loss"]))
        times.append(time.perf_counter() - tick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps({
        "step_s": statistics.median(times[1:]), "peak_mib": peak - base, "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = random_shard(Path(tmp) / "random")
        overrides = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                     "model.num_attention_heads=8", "model.seq_length=256",
                     "model.max_position_embeddings=256", f"model.vocab_size={VOCAB}",
                     "model.activation_checkpointing=none", "train.micro_batch_size=4",
                     "train.global_batch_size=4", f"train.max_steps={args.steps + 1}",
                     "train.eval_interval=0", "train.save_interval=0", "train.precision=fp32",
                     f"data.data_path={prefix}", "log.tensorboard=false",
                     "parallel.tensor_parallel_size=2", f"train.run_dir={tmp}/run"]
        results: dict[str, list[dict]] = {"copy": [], "in place": []}
        for r in range(args.repeats):
            for name in (("copy", "in place") if r % 2 == 0 else ("in place", "copy")):
                out = Path(tmp) / f"{name.replace(' ', '_')}{r}"
                out.mkdir()
                run_distributed(_worker, 2, overrides, str(out), name == "in place",
                                tp_size=2)
                results[name] += [json.loads(p.read_text()) for p in sorted(out.glob("r*"))]
        b, s, h = 4, 256, args.hidden
        print(f"GPT {args.layers}L h{h}, seq {s}, micro-batch {b}, vocab {VOCAB}, fp32, TP=2 "
              f"(gloo, 1 thread per rank), {args.steps} timed steps x {args.repeats} runs")
        print(f"{'all-reduce':10} {'step s':>7} {'peak RSS growth MiB/rank':>26}")
        for name, rows in results.items():
            print(f"{name:10} {statistics.median(x['step_s'] for x in rows):7.3f} "
                  f"{statistics.median(x['peak_mib'] for x in rows):26.0f}")
        same = all(x["losses"] == results["copy"][0]["losses"]
                   for rows in results.values() for x in rows)
        print(f"copies avoided per step: {4 * args.layers} x {b * s * h * 4 / 2**20:.1f} MiB; "
              f"losses identical in every run: {same}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
