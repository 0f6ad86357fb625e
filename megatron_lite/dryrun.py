"""``--dry-run`` of the commands that train (train, distill, search): what a run would be,
without running it.

    python -m megatron_lite.train CONFIG [key=value ...] --dry-run

Resolves the config for this job's layout exactly as the run would
(:func:`megatron_lite.resolve.resolve_config`: every check, the tokenizer's vocabulary,
the fit check), then prints the resolved config, the layout, the data plan and the
planner's verdict (:mod:`megatron_lite.plan`) on the main rank, and returns 0. Nothing is
trained and nothing is written: no run folder, no lock, no dataset index caches (the
shard's own index is only read). A config that cannot run fails here with the run's own
one-line error.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from megatron_lite.checkpoint import read_meta, resolve_checkpoint
from megatron_lite.config import Config
from megatron_lite.data.gpt_dataset import split_ranges
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.devices import DEVICES, device_for_cuda_name
from megatron_lite.parallel import ParallelContext
from megatron_lite.plan import plan, report, suggest
from megatron_lite.resolve import resolve_config


def planner_device(ctx: ParallelContext) -> str:
    """This job's device as the planner names it (a known GPU, its memory, or ``cpu``)."""
    if ctx.device.type != "cuda":
        return "cpu"
    known = device_for_cuda_name(torch.cuda.get_device_name(ctx.device))
    if known is not None:
        return next(key for key, d in DEVICES.items() if d is known)
    return f"{torch.cuda.get_device_properties(ctx.device).total_memory // 2**20}M"


def layout_lines(cfg: Config, ctx: ParallelContext, auto: bool = False) -> list[str]:
    t, m = cfg.train, cfg.model
    accum = t.global_batch_size // (t.micro_batch_size * ctx.dp_size)
    micro = "auto (probed at start; planned here at 1)" if auto else str(t.micro_batch_size)
    return [f"layout: world size {ctx.world_size} = TP {ctx.tp_size} x DP {ctx.dp_size} on "
            f"{ctx.device.type}; parallel.engine={cfg.parallel.engine}",
            f"batch: micro-batch {micro} x accumulation {accum} x DP {ctx.dp_size} = "
            f"{t.global_batch_size} samples = {t.global_batch_size * m.seq_length} tokens "
            f"per step; {t.max_steps} steps ({t.precision})"]


def data_lines(cfg: Config) -> list[str]:
    """The shard, its split and how much of the training split the run reads."""
    d, t, m = cfg.data, cfg.train, cfg.model
    if not d.data_path:
        return ["data: data.data_path is not set"]
    shard = IndexedDataset(d.data_path)
    lengths = shard.sequence_lengths.astype("int64")
    docs = shard.document_indices
    ranges = split_ranges(shard.num_documents, d.split)

    def tokens(lo: int, hi: int) -> int:
        return int(lengths[docs[lo]:docs[hi]].sum()) if hi > lo else 0

    names = ("train", "valid", "test")
    parts = ", ".join(f"{n} {hi - lo} docs / {tokens(lo, hi)} tokens"
                      for n, (lo, hi) in zip(names, ranges, strict=True))
    lines = [f"data: {d.data_path}: {shard.num_documents} documents, {shard.num_tokens} "
             f"tokens; data.split={d.split}: {parts}"]
    need = t.max_steps * t.global_batch_size * m.seq_length
    have = tokens(*ranges[0])
    epochs = f" = {need / have:.2f} epochs of the train split" if have else ""
    lines.append(f"reads: {t.max_steps} steps x {t.global_batch_size} samples x "
                 f"{m.seq_length} tokens = {need} tokens{epochs}")
    if t.eval_interval > 0 and t.eval_iters > 0:
        lines.append(f"validation: every {t.eval_interval} steps, {t.eval_iters} x "
                     f"{t.global_batch_size} samples of the valid split")
    return lines


def resume_line(cfg: Config) -> str:
    run_dir = Path(cfg.train.run_dir)
    if (run_dir / "checkpoints" / "latest").is_file():
        step = read_meta(resolve_checkpoint(run_dir))["step"]
        return f"run folder: {run_dir} holds a checkpoint at step {step}: the run would resume"
    if cfg.train.load:
        return (f"run folder: {run_dir} (new); starts from train.load={cfg.train.load}"
                f"{' (weights only: train.finetune)' if cfg.train.finetune else ''}")
    return f"run folder: {run_dir} (new)"


def dry_run(cfg: Config, ctx: ParallelContext, extra: list[str] = ()) -> int:
    """Resolve ``cfg`` as the run would and print what the run would be (main rank);
    ``extra``: the command's own lines (the teacher, the search). Returns 0."""
    t = cfg.train
    auto = t.micro_batch_size == 0
    t.micro_batch_size = t.micro_batch_size or 1  # auto: 1 until probed, as the Trainer
    resolve_config(cfg, ctx, training=True)
    if not ctx.is_main:
        return 0
    device = planner_device(ctx)
    with torch.device("meta"):
        verdict = plan(cfg, ctx.tp_size, ctx.dp_size, device)
        if not verdict["fits"]:
            verdict["suggestion"] = suggest(cfg, ctx.tp_size, ctx.dp_size, device)
    lines = [*layout_lines(cfg, ctx, auto), *data_lines(cfg), resume_line(cfg), *extra]
    if auto:
        t.micro_batch_size = 0
    lines = ["resolved config:", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
             *lines, f"planner ({device}):",
             *("  " + line for line in report(verdict).splitlines()),
             "dry run: nothing trained, nothing written"]
    print("\n".join(lines), flush=True)
    return 0
