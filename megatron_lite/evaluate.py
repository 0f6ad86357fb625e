"""Evaluate a checkpoint (or a fresh model) on a split of its data.

    python -m megatron_lite.evaluate runs/gpt2-tiny-cpu [--split valid] [--iters 20]
    torchrun --nproc_per_node 2 -m megatron_lite.evaluate CKPT --tp 2
    python -m megatron_lite.evaluate --config configs/gpt2/tiny-cpu.yaml data.data_path=...

GPT: loss and perplexity. BERT: MLM loss and accuracy on the masked positions, NSP
accuracy. Prints one JSON line (rank 0); loads at any TP size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import torch.distributed as dist

from megatron_lite.cli import run_cli
from megatron_lite.config import load_config
from megatron_lite.data.indexed import IndexedDataError
from megatron_lite.parallel import (
    destroy_parallel,
    gather_from_tp_region,
    init_parallel,
)
from megatron_lite.training.checkpoint import load_checkpoint, resolve_checkpoint
from megatron_lite.training.precision import autocast


def _sum_dp(ctx, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.dp_group is not None:
        dist.all_reduce(t, group=ctx.dp_group)
    return t.tolist()


@torch.no_grad()
def evaluate(trainer, split: str = "valid", iters: int | None = None) -> dict:
    """Metrics of ``trainer.model`` on ``iters`` global batches of a split."""
    cfg, ctx, model = trainer.cfg, trainer.ctx, trainer.model
    data = trainer.valid_data if split == "valid" else trainer.train_data
    if data is None:
        raise IndexedDataError(f"the {split} split is empty")
    iters = (iters or cfg.train.eval_iters) * trainer.accum
    model.eval()
    vocab = cfg.model.vocab_size
    sums = [0.0] * 6  # loss, batches, mlm correct, mlm total, nsp correct, nsp total
    for batch in itertools.islice(trainer._iterator(data, 0), iters):
        batch = trainer._to_device(batch)
        with autocast(cfg.train.precision, ctx.device):
            if cfg.model.arch == "bert":  # one forward for the loss and the accuracies
                inputs = {k: v for k, v in batch.items() if "labels" not in k}
                mlm_logits, nsp_logits = model(**inputs)
                loss, _ = model.loss(mlm_logits, nsp_logits, batch["mlm_labels"],
                                     batch["nsp_labels"])
            else:
                loss = model(**batch)
            sums[0] += float(loss)
            sums[1] += 1
            if cfg.model.arch == "bert":
                pred = gather_from_tp_region(mlm_logits, ctx.tp_group)[..., :vocab].argmax(-1)
                picked = batch["mlm_labels"] >= 0
                sums[2] += float((pred[picked] == batch["mlm_labels"][picked]).sum())
                sums[3] += float(picked.sum())
                sums[4] += float((nsp_logits.argmax(-1) == batch["nsp_labels"]).sum())
                sums[5] += float(batch["nsp_labels"].numel())
    sums = _sum_dp(ctx, sums)
    loss = sums[0] / sums[1]
    out = {"split": split, "step": trainer.step, "batches": int(sums[1]), "loss": loss}
    if cfg.model.arch == "gpt":
        out["perplexity"] = math.exp(min(loss, 50.0))
    else:
        out["mlm_accuracy"] = sums[2] / max(sums[3], 1)
        out["nsp_accuracy"] = sums[4] / max(sums[5], 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.evaluate", description=__doc__)
    p.add_argument("checkpoint", nargs="?", help="run dir, checkpoints dir or step folder")
    p.add_argument("--config", help="evaluate a freshly initialized model of this config")
    p.add_argument("--split", choices=("valid", "train"), default="valid")
    p.add_argument("--iters", type=int, default=None, help="global batches (default eval_iters)")
    p.add_argument("--tp", type=int, default=None, help="TP size (default: the world size)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = p.parse_args(argv)
    if a.checkpoint and "=" in a.checkpoint:  # with --config every positional is an override
        a.overrides.insert(0, a.checkpoint)
        a.checkpoint = None
    if bool(a.checkpoint) == bool(a.config):
        p.error("give a checkpoint or --config (one of them)")
    def body() -> None:
        ckpt = resolve_checkpoint(a.checkpoint) if a.checkpoint else None
        cfg = load_config(ckpt / "config.yaml" if ckpt else a.config, a.overrides)
        from megatron_lite.parallel import read_launch_env

        world = read_launch_env().world_size
        tp = a.tp or world
        cfg.parallel.tensor_parallel_size = tp
        cfg.train.load = None
        t = cfg.train
        if world % tp == 0 and t.global_batch_size % (t.micro_batch_size * (world // tp)):
            t.global_batch_size = t.micro_batch_size * (world // tp)  # fit the new layout
        t.max_steps = max(t.max_steps, 1)
        t.eval_interval = t.eval_interval or 1  # build the validation split in any case
        t.eval_iters = a.iters or t.eval_iters or 1
        ctx = init_parallel(tp, seed=cfg.train.seed)
        try:
            from megatron_lite.training.trainer import Trainer

            trainer = Trainer(cfg, ctx, training=False)
            if ckpt:
                trainer.step = load_checkpoint(ckpt, trainer.model, None, ctx)["step"]
            result = evaluate(trainer, a.split, a.iters)
            if ctx.is_main:
                print(json.dumps(result))
        finally:
            destroy_parallel()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
