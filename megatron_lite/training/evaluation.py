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

from megatron_lite.data.blend import BlendedDataset, parse_blend, split_source
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
    cfg, ctx = run.cfg, run.ctx
    precision = precision or (lambda: autocast(cfg.train.precision, ctx.device))
    key, whole = split_source(cfg.data, split)
    sources = parse_blend(getattr(cfg.data, key.split(".")[1]), key)
    parts = {}
    for source in sources:  # a blend: each source's stream alone, then the weighted total
        indexed = IndexedDataset(source.prefix)
        rng = (0, indexed.num_documents) if whole else \
            split_ranges(indexed.num_documents, cfg.data.split)[
                {"train": 0, "valid": 1, "test": 2}[split]]
        parts[source.prefix] = _evaluate_stream(run, TokenStream(indexed, rng, split),
                                                max_tokens, precision)
    if len(sources) == 1:
        return parts[sources[0].prefix]
    return _weighted(sources, parts)


def _weighted(sources, parts: dict[str, dict]) -> dict:
    """The sources' results weighted by the blend (counts and speeds summed), with
    ``loss_per_source``."""
    first = parts[sources[0].prefix]
    out = {}
    for k, v in first.items():
        values = [parts[s.prefix][k] for s in sources]
        if k in ("tokens", "samples", "global_batches"):
            out[k] = sum(values)
        elif k == "tokens_per_sec":  # all tokens over all the seconds
            seconds = sum(parts[s.prefix]["tokens"] / max(x, 1e-12)
                          for s, x in zip(sources, values, strict=True))
            out[k] = sum(parts[s.prefix]["tokens"] for s in sources) / max(seconds, 1e-12)
        elif isinstance(v, float):
            out[k] = sum(s.weight * x for s, x in zip(sources, values, strict=True))
        else:
            out[k] = v
    if "perplexity" in out:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["loss_per_source"] = {s.prefix: parts[s.prefix]["loss"] for s in sources}
    return out


def _evaluate_stream(run: Run, stream: TokenStream, max_tokens: int | None,
                     precision) -> dict:
    cfg, ctx, model = run.cfg, run.ctx, run.model
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
        split: ``valid``, ``train`` or ``test``.
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
    if split == "test":  # built when asked (data.test_data_path, or data.split's third part)
        data = run.split_data("test", iters * cfg.train.global_batch_size)
    else:
        data = run.valid_data if split == "valid" else run.train_data
    if data is None:
        raise IndexedDataError(f"the {split} split is empty")
    if isinstance(data, BlendedDataset):  # each source alone, then the weighted total
        return _weighted(data.sources, {
            s.prefix: _evaluate_data(run, part, iters, precision)
            for s, part in zip(data.sources, data.datasets, strict=True)})
    return _evaluate_data(run, data, iters, precision)


def _evaluate_data(run: Run, data, iters: int, precision) -> dict:
    cfg, ctx, model = run.cfg, run.ctx, run.model
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
    if "loss_per_source" in result:  # a blend: val_loss is the weighted total
        out["val_loss_per_source"] = result["loss_per_source"]
    return out
