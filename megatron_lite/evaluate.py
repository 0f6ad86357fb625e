"""Evaluate a checkpoint (or a fresh model) on a split of its data.

    python -m megatron_lite.evaluate runs/gpt2-tiny-cpu [--split valid] [--iters 20]
    torchrun --nproc_per_node 2 -m megatron_lite.evaluate CKPT --tp 2
    python -m megatron_lite.evaluate --config configs/gpt2/tiny-cpu.yaml data.data_path=...

GPT: loss and perplexity. A relative-position (Transformer-XL) model is evaluated by
its protocol: the whole split (``--iters N``: N global batches of segments) in
consecutive segments with the memory carried, e.g. ``evaluate RUN model.mem_len=640
model.seq_length=64``; it prints targets scored and tokens/s too.
BERT: MLM loss and accuracy on the masked positions, NSP
accuracy. Prints one JSON line (rank 0); loads at any TP size.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_lite.cli import parse_args, path_and_overrides, run_cli
from megatron_lite.config import load_config
from megatron_lite.parallel import destroy_parallel, init_parallel, read_launch_env
from megatron_lite.run import build_run
from megatron_lite.training.checkpoint import load_checkpoint, resolve_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="run dir, checkpoints dir or step folder")
    p.add_argument("--config", help="evaluate a freshly initialized model of this config")
    p.add_argument("--split", choices=("valid", "train"), default="valid")
    p.add_argument("--iters", type=int, default=None, help="global batches (default eval_iters)")
    p.add_argument("--tp", type=int, default=None, help="TP size (default: the world size)")
    p.add_argument("overrides", nargs="*", help="section.key=value (anywhere on the line)")
    a = parse_args(p, argv)
    path_and_overrides(p, a, required=False)
    if bool(a.checkpoint) == bool(a.config):
        p.error("give a checkpoint or --config (one of them)")

    def body() -> None:
        ckpt = resolve_checkpoint(a.checkpoint) if a.checkpoint else None
        cfg = load_config(ckpt / "config.yaml" if ckpt else a.config, a.overrides)
        world = read_launch_env().world_size
        tp = a.tp or world
        cfg.parallel.tensor_parallel_size = tp
        cfg.train.load = None
        t = cfg.train
        if world % tp == 0 and t.global_batch_size % (t.micro_batch_size * (world // tp)):
            t.global_batch_size = t.micro_batch_size * (world // tp)  # fit the new layout
        t.max_steps = max(t.max_steps, 1)
        t.eval_iters = a.iters or t.eval_iters or 1
        ctx = init_parallel(tp, seed=cfg.train.seed)
        try:
            run = build_run(cfg, ctx, training=False)
            step = load_checkpoint(ckpt, run.model, ctx)["step"] if ckpt else 0
            result = {"split": a.split, "step": step, **run.evaluate(a.split, a.iters)}
            if ctx.is_main:
                print(json.dumps(result))
        finally:
            destroy_parallel()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
