"""Zero-shot evaluation as the Megatron-LM paper reports it (GPT): WikiText perplexity with
overlapping windows, and LAMBADA last-word accuracy. Used by ``evaluate --task``.

WikiText (``evaluate RUN --task wikitext --input FILE.txt [--overlap N]``): the file is
one token stream (the run's tokenizer). Window ``i`` reads ``seq_length`` tokens from
``i * stride`` (``stride = seq_length - overlap``) and scores only the targets no earlier
window scored: the first window all of them, every later one its last ``stride``, so each
target is scored exactly once and, after the first window, with ``overlap`` tokens of
context re-read. ``1 + ceil(max(N - seq_length, 0) / stride)`` forwards for ``N``
targets. Reported: the token perplexity ``exp(loss)`` and the word-level perplexity
``exp(loss * (T - 1) / (W - 1))`` for ``T`` tokens and ``W`` space-separated words
(Megatron's count, ``len(text.strip().split(" "))``, and its adjustment to the original
tokenization, e.g. WikiText-103's). Megatron detokenizes WikiText first: give this the
detokenized text (the file is read as it is).

LAMBADA (``--task lambada --input FILE.jsonl``, ``{"text": ...}`` per line): the passage
without its last word is the context; the prediction is right when greedy decoding
reproduces every token of `` last_word`` (tokenized on its own, with its leading space).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_lite.config import ConfigError
from megatron_lite.parallel import vocab_parallel_argmax
from megatron_lite.parallel.comm import all_reduce


class TaskInputError(ValueError):
    """An input file the task cannot use (the message names it)."""


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" forward", disable=not enabled or total < 2,
                mininterval=1.0)


def windows(num_targets: int, seq: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, first_scored)`` of each window over ``num_targets`` targets: inputs
    ``tokens[start:start + seq]``, scored targets from offset ``first_scored`` on."""
    if not 0 <= overlap < seq:
        raise ConfigError(f"--overlap {overlap} must be in [0, seq_length={seq})")
    stride = seq - overlap
    out = [(0, 0)]
    while out[-1][0] + seq < num_targets:
        start = out[-1][0] + stride
        out.append((start, seq - stride))
    return out


def _check_gpt(run) -> None:
    if run.cfg.model.arch != "gpt":
        raise ConfigError("zero-shot tasks are for GPT models (model.arch=gpt)")
    if run.tokenizer is None:
        raise ConfigError("the run's config names no tokenizer (data.tokenizer_type, "
                          "data.vocab_file): the task tokenizes raw text with it")


@torch.no_grad()
def wikitext(run, path: str | Path, overlap: int | None = None, progress: bool = True) -> dict:
    """Perplexity of a raw text file with overlapping windows (see the module docstring)."""
    _check_gpt(run)
    cfg, ctx, model = run.cfg, run.ctx, run.model
    path = Path(path)
    text = _read_text(path)
    words = len(text.strip().split(" "))  # Megatron's count: a line end joins two words
    tokens = run.tokenizer.encode(text)
    if len(tokens) < 2 or words < 2:
        raise TaskInputError(f"{path}: {len(tokens)} tokens, {words} words: nothing to score")
    seq = cfg.model.seq_length
    overlap = seq // 2 if overlap is None else overlap
    targets = len(tokens) - 1
    plan = windows(targets, seq, overlap)
    ids = torch.tensor(tokens, dtype=torch.long)
    mb = cfg.train.micro_batch_size
    mine = plan[ctx.dp_rank::ctx.dp_size]  # DP ranks take every dp_size-th window
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, targets
    model.eval()
    bar = _progress(len(plan), "wikitext", ctx.is_main and progress)
    for i in range(0, len(mine), mb):
        batch = mine[i:i + mb]
        inputs = torch.zeros(len(batch), seq, dtype=torch.long)
        labels = torch.full((len(batch), seq), -100, dtype=torch.long)
        for row, (start, first) in enumerate(batch):
            window = ids[start:start + seq + 1]
            n = len(window) - 1
            inputs[row, :n], labels[row, first:n] = window[:-1], window[1 + first:]
        # the chunked output layer + loss: no [mb, seq, V/tp] logits
        sums[0] += model(inputs.to(ctx.device), labels.to(ctx.device),
                         reduction="sum").double()
        sums[1] += (labels != -100).sum()
        bar.update(len(batch) * ctx.dp_size)
    bar.close()
    loss_sum, scored = all_reduce(sums, ctx.dp_group).tolist()
    assert int(scored) == targets, (scored, targets)  # each target exactly once
    loss = loss_sum / scored
    ratio = (len(tokens) - 1) / (words - 1)  # Megatron: (T - 1) / (W - 1), T tokens
    return {"task": "wikitext", "input": str(path), "tokens": len(tokens), "targets": targets,
            "words": words, "token_word_ratio": ratio, "seq_length": seq, "overlap": overlap,
            "forwards": len(plan), "loss": loss, "token_perplexity": math.exp(min(loss, 50.0)),
            "word_perplexity": math.exp(min(loss * ratio, 50.0))}


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TaskInputError(f"{path}: cannot read ({err.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise TaskInputError(f"{path}: empty file")
    return text


def lambada_items(path: Path, tokenizer, max_len: int) -> tuple[list, dict]:
    """``([(context ids, target ids)], skipped counts)`` of a LAMBADA jsonl file."""
    skipped = {"not_json": 0, "no_text": 0, "too_short": 0}
    items = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise TaskInputError(f"{path}: cannot read ({err.strerror})") from None
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skipped["not_json"] += 1
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            skipped["no_text"] += 1
            continue
        text = text.strip()
        cut = text.rfind(" ")
        if cut <= 0 or not text[:cut].strip():  # fewer than two words
            skipped["too_short"] += 1
            continue
        context, target = tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])
        if not context or not target or len(target) >= max_len:
            skipped["too_short"] += 1
            continue
        items.append((context[-(max_len - len(target) + 1):], target))  # keep the end
    if not items:
        why = ", ".join(f"{v} {k}" for k, v in skipped.items() if v) or "empty file"
        raise TaskInputError(f"{path}: no usable passage ({why})")
    return items, skipped


@torch.no_grad()
def lambada(run, path: str | Path, progress: bool = True) -> dict:
    """Last-word accuracy (greedy, every token of the last word) of a jsonl file."""
    _check_gpt(run)
    cfg, ctx, model = run.cfg, run.ctx, run.model
    path = Path(path)
    items, skipped = lambada_items(path, run.tokenizer, model.positions.context_limit())
    mb = cfg.train.micro_batch_size
    indices = list(range(ctx.dp_rank, len(items), ctx.dp_size))
    correct = torch.zeros(len(items), dtype=torch.float64, device=ctx.device)
    model.eval()
    bar = _progress(-(-len(items) // mb), "lambada", ctx.is_main and progress)
    for i in range(0, len(indices), mb):
        batch = indices[i:i + mb]
        length = max(len(items[j][0]) + len(items[j][1]) - 1 for j in batch)
        pad = run.tokenizer.eod or 0
        inputs = torch.full((len(batch), length), pad, dtype=torch.long)
        for row, j in enumerate(batch):  # right padding: causal attention never sees it
            seq = items[j][0] + items[j][1][:-1]
            inputs[row, :len(seq)] = torch.tensor(seq)
        pred = vocab_parallel_argmax(model(inputs.to(ctx.device)), ctx.tp_group,
                                     cfg.model.vocab_size).cpu()
        for row, j in enumerate(batch):
            context, target = items[j]
            guess = pred[row, len(context) - 1:len(context) - 1 + len(target)]
            correct[j] = float(guess.tolist() == target)
        bar.update(1)
    bar.close()
    correct = all_reduce(correct, ctx.dp_group)
    return {"task": "lambada", "input": str(path), "passages": len(items),
            "correct": int(correct.sum()), "accuracy": float(correct.mean()),
            "skipped": skipped, "predictions": correct.long().tolist()}
