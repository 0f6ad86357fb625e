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

Zero-shot tasks as in the Megatron-LM paper (GPT; see megatron_lite/tasks.py):

    python -m megatron_lite.evaluate RUN --task wikitext --input wiki.test.txt [--overlap 512]
    python -m megatron_lite.evaluate RUN --task lambada --input lambada_test.jsonl

wikitext: token and word-level perplexity of a raw text file with overlapping windows
(``--overlap`` tokens of context re-read per window, default half the window; each
token scored once). lambada: accuracy of greedily predicting every token of each
passage's last word. No download: you give the file.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_lite import tasks
from megatron_lite.checkpoint import load_checkpoint, resolve_checkpoint
from megatron_lite.cli import parse_args, path_and_overrides, run_cli
from megatron_lite.config import load_config
from megatron_lite.parallel import parallel_session, read_launch_env
from megatron_lite.parallel.pipeline import unpipelined
from megatron_lite.run import build_run
from megatron_lite.training.evaluation import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="run dir, checkpoints dir or step folder")
    p.add_argument("--config", help="evaluate a freshly initialized model of this config")
    p.add_argument("--split", choices=("valid", "train", "test"), default="valid",
                   help="test: data.test_data_path if set, else data.split's third part")
    p.add_argument("--iters", type=int, default=None, help="global batches (default eval_iters)")
    p.add_argument("--tp", type=int, default=None, help="TP size (default: the world size)")
    p.add_argument("--task", choices=("wikitext", "lambada"),
                   help="a zero-shot task on --input instead of the run's validation split")
    p.add_argument("--input", help="--task's file: raw text (wikitext) or jsonl (lambada)")
    p.add_argument("--overlap", type=int, default=None,
                   help="wikitext: tokens of context re-read per window (default seq/2)")
    p.add_argument("overrides", nargs="*", help="section.key=value (anywhere on the line)")
    a = parse_args(p, argv)
    path_and_overrides(p, a, required=False)
    if bool(a.checkpoint) == bool(a.config):
        p.error("give a checkpoint or --config (one of them)")
    if bool(a.task) != bool(a.input):
        p.error("--task and --input go together")

    def body() -> None:
        ckpt = resolve_checkpoint(a.checkpoint) if a.checkpoint else None
        cfg = load_config(ckpt / "config.yaml" if ckpt else a.config, a.overrides)
        world = read_launch_env().world_size
        tp = a.tp or world
        cfg.parallel.tensor_parallel_size = tp
        unpipelined(cfg)  # a pipelined run's checkpoint loads at PP=1
        cfg.train.load = None
        t = cfg.train
        if world % tp == 0 and t.global_batch_size % (t.micro_batch_size * (world // tp)):
            t.global_batch_size = t.micro_batch_size * (world // tp)  # fit the new layout
        t.max_steps = max(t.max_steps, 1)
        t.eval_iters = a.iters or t.eval_iters or 1
        with parallel_session(tp, seed=cfg.train.seed) as ctx:
            run = build_run(cfg, ctx, training=False, data=not a.task)
            step = load_checkpoint(ckpt, run.model, ctx)["step"] if ckpt else 0
            if a.task == "wikitext":
                result = {"step": step, **tasks.wikitext(run, a.input, a.overlap)}
            elif a.task == "lambada":
                result = {"step": step, **tasks.lambada(run, a.input)}
                result.pop("predictions")
            else:
                result = {"split": a.split, "step": step, **evaluate(run, a.split, a.iters)}
            if ctx.is_main:
                print(json.dumps(result))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
