"""Evaluation of a built run: validation during training, the ``evaluate`` command.

:func:`evaluate` reads ``iters`` global batches of a split (the same samples at every
TP/DP layout); a model whose position scheme carries a memory (Transformer-XL) is read
as one stream instead (:func:`evaluate_stream`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from megatron_lite.data.gpt_dataset import split_ranges
from megatron_lite.data.indexed import IndexedDataError, IndexedDataset
from megatron_lite.data.stream import TokenStream
from megatron_lite.models.bert import bert_metrics
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.run import Run
from megatron_lite.training.precision import autocast


@torch.no_grad()
def evaluate_stream(run: Run, split: str = "valid", max_tokens: int | None = None,
                    precision=None) -> dict:
    """Transformer-XL's evaluation: the split's token stream (or its first
    ``max_tokens`` targets) in consecutive segments of ``model.seq_length``, every
    target predicted exactly once, the memory (``model.mem_len``) carried from segment
    to segment. The stream is cut into ``micro_batch_size x DP`` lanes (each starts
    without memory). Returns loss, perplexity, targets and tokens/s. A model with learned
    positions can be read this way too (each segment alone): the baseline of the
    Transformer-XL comparison."""
    cfg, ctx, model = run.cfg, run.ctx, run.model
    precision = precision or (lambda: autocast(cfg.train.precision, ctx.device))
    indexed = IndexedDataset(cfg.data.data_path)
    index = {"train": 0, "valid": 1, "test": 2}[split]
    stream = TokenStream(indexed, split_ranges(indexed.num_documents, cfg.data.split)[index],
                         split)
    total = stream.num_tokens - 1  # every token after the first is a target
    if max_tokens:
        total = min(total, max_tokens)
    mb, seg = cfg.train.micro_batch_size, cfg.model.seq_length
    lanes = mb * ctx.dp_size
    lane = -(-total // lanes)  # targets per lane (the last lane may hold fewer)
    inputs = np.zeros((mb, lane), dtype=np.int64)
    labels = np.full((mb, lane), -100, dtype=np.int64)
    for row in range(mb):  # this DP rank's lanes
        start = (ctx.dp_rank * mb + row) * lane
        n = max(0, min(lane, total - start))
        if n:
            tokens = stream.read(start, n + 1)
            inputs[row, :n], labels[row, :n] = tokens[:-1], tokens[1:]
    inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
    # a learned-position model reads each segment alone (positions 0..seg-1)
    memory = model.positions.new_memory()
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, targets
    tick = time.perf_counter()
    for start in range(0, lane, seg):
        ids = inputs[:, start:start + seg].to(ctx.device)
        target = labels[:, start:start + seg].to(ctx.device)
        with precision():  # the chunked output layer + loss: no [mb, seg, V/tp] logits
            loss_sum = model(ids, target, memory=memory, reduction="sum")
        sums[0] += loss_sum.double()
        sums[1] += (target != -100).sum()
    loss_sum, count = all_reduce(sums, ctx.dp_group).tolist()
    seconds = time.perf_counter() - tick
    loss = loss_sum / max(count, 1)
    return {"tokens": int(count), "segment": seg, "mem_len": cfg.model.mem_len,
            "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "tokens_per_sec": count / seconds}

@torch.no_grad()
def evaluate(run: Run, split: str = "valid", iters: int | None = None,
             precision: Callable[[], contextlib.AbstractContextManager] | None = None
             ) -> dict:
    """Metrics of ``run``'s model on ``iters`` global batches (default ``eval_iters``) of a
    split, the same samples at every TP/DP layout; ``global_batches`` and ``samples``
    say how much was read.

    GPT: ``loss`` and ``perplexity``. BERT: ``loss`` (MLM + NSP, what training
    minimizes), ``mlm_loss``, ``nsp_loss``, ``mlm_accuracy`` on the masked positions
    and ``nsp_accuracy`` (:meth:`BertModel.stats`). Leaves the model in eval mode.

    Args:
        split: ``valid`` or ``train``.
        iters: global batches to read.
        precision: the autocast context to run in (default: ``train.precision``'s).
    """
    cfg, ctx, model = run.cfg, run.ctx, run.model
    precision = precision or (lambda: autocast(cfg.train.precision, ctx.device))
    if model.positions.carries_memory:  # None: the whole split
        t = cfg.train
        return evaluate_stream(
            run, split, iters and iters * t.global_batch_size * cfg.model.seq_length, precision)
    iters = iters or cfg.train.eval_iters
    data = run.valid_data if split == "valid" else run.train_data
    if data is None:
        raise IndexedDataError(f"the {split} split is empty")
    bert = cfg.model.arch == "bert"
    model.eval()
    # loss sum, micro-batches, samples, then BERT's stats summed over micro-batches
    sums = torch.zeros(3 + 6 * bert, dtype=torch.float64, device=ctx.device)
    for batch in itertools.islice(run.batches(data), iters * run.accum):
        batch = run.to_device(batch)
        with precision():
            loss = model(**batch)
        sums[:3] += torch.stack([loss.detach().double(), sums.new_tensor(1.0),
                                 sums.new_tensor(float(len(batch["input_ids"])))])
        if bert:
            sums[3:] += model.last_stats
    sums = all_reduce(sums, ctx.dp_group).tolist()
    loss, micro = sums[0] / sums[1], sums[1]
    out = {"global_batches": iters, "samples": int(sums[2]), "loss": loss}
    if bert:
        return {**out, **bert_metrics(sums[3:], micro)}
    return {**out, "perplexity": math.exp(min(loss, 50.0))}


def validation_metrics(result: dict) -> dict:
    """An :func:`evaluate` result as a training record's ``val_*`` keys: GPT ``val_loss``
    and ``val_ppl``; BERT ``val_loss`` (MLM + NSP) and its parts and accuracies (its counts
    and speed left out)."""
    keys = ("loss", "perplexity", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")
    out = {f"val_{k}": result[k] for k in keys if k in result}
    if "val_perplexity" in out:
        out["val_ppl"] = out.pop("val_perplexity")
    return out
