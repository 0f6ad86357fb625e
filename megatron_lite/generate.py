"""Generate text from a GPT checkpoint, at any TP size.

    python -m megatron_lite.generate runs/gpt2-tiny-cpu --prompt "Return the" --max-new-tokens 40
    python -m megatron_lite.generate RUN --prompt "..." data.vocab_file=... data.merge_file=...
    torchrun --nproc_per_node 2 -m megatron_lite.generate CKPT --prompt "..." --top-p 0.9

Greedy with ``--greedy``; otherwise sampling with ``--temperature``, ``--top-k`` and
``--top-p``. Every TP rank gathers the full vocabulary's logits and draws with the same
seeded generator, so all ranks pick the same token.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from megatron_lite.checkpoint import load_checkpoint, resolve_checkpoint
from megatron_lite.cli import parse_args, path_and_overrides, run_cli
from megatron_lite.config import ConfigError, load_config
from megatron_lite.hooks import TrainingHook
from megatron_lite.models import GPTModel, KVCache
from megatron_lite.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    gather_from_tp_region,
    parallel_session,
    read_launch_env,
)
from megatron_lite.parallel.pipeline import unpipelined
from megatron_lite.resolve import names_tokenizer
from megatron_lite.run import build_run


def next_token(logits: torch.Tensor, gen: torch.Generator, greedy: bool, temperature: float,
               top_k: int, top_p: float) -> int:
    """Pick a token from ``[vocab]`` logits (greedy, or temperature / top-k / top-p sampling)."""
    if greedy:
        return int(logits.argmax())
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # smallest nucleus
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


@contextlib.contextmanager
def decode_layout(model: GPTModel, restore: bool = True) -> Iterator[None]:
    """Inside the block, the weights ``F.linear`` multiplies (the TP layers', ``nn.Linear``'s
    and the tied output layer's) are stored input-major: the same ``[out, in]`` tensors
    with swapped strides. One token at a time the product is a matrix-vector one, which
    this CPU computes about 2x faster from an ``[in, out]`` layout (``x @ W.t()`` is then a
    plain contiguous ``x @ A``; transformers' GPT-2 keeps its ``Conv1D`` weights that way).
    Values are untouched. Entering copies each weight once (about 0.25 s for GPT-2 124M
    here), so the command line enters it once for all of its tokens; ``restore`` makes
    the weights contiguous again on exit (another copy each)."""
    params = [m.weight for m in model.modules()
              if isinstance(m, (ColumnParallelLinear, RowParallelLinear, nn.Linear))]
    params.append(model.wte.weight)
    params = [p for p in dict.fromkeys(params) if p.dim() == 2 and p.is_contiguous()]
    for p in params:
        p.data = p.data.t().contiguous().t()
    try:
        yield
    finally:
        if restore:
            for p in params:
                p.data = p.data.contiguous()


@torch.no_grad()
def generate(model: GPTModel, ctx: ParallelContext, prompt_ids: list[int], max_new_tokens: int,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eod: int | None = None,
             use_cache: bool = True) -> list[int]:
    """Continue ``prompt_ids``; stops at ``eod`` or after ``max_new_tokens``.

    With ``use_cache`` each new token runs through the model alone, attending to the
    cached keys/values of the earlier ones. Past ``max_position_embeddings`` the context
    is the last window of tokens, recomputed at every step (as without the cache).

    A model whose position scheme carries a memory (Transformer-XL) caches with it
    instead (:meth:`PositionScheme.decoding_memory`: the last ``mem_len``, else
    ``max_position_embeddings``, positions of every attention sublayer's input, carried
    forever); without the cache each step recomputes the last ``that + 1`` tokens (the
    same tokens while nothing has been dropped from the memory).
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    window = model.cfg.max_position_embeddings
    memory = model.positions.decoding_memory(window)
    if memory is not None:
        window = memory.mem_len + 1
    ids = list(prompt_ids)
    vocab = model.cfg.vocab_size
    cache = None
    for _ in range(max_new_tokens):
        if memory is not None and use_cache:
            if cache is None:
                cache = memory
                x = torch.tensor([ids], device=ctx.device)
            else:
                x = torch.tensor([ids[-1:]], device=ctx.device)
            logits = model(x, memory=cache)[:, -1]
        else:
            if not use_cache or cache is None or cache.length >= window:
                # (re)fill from the last window
                cache = KVCache(capacity=window) if use_cache else None
                x = torch.tensor([ids[-window:]], device=ctx.device)
            else:
                x = torch.tensor([ids[-1:]], device=ctx.device)
            logits = model(x, cache=cache)[:, -1]
        logits = gather_from_tp_region(logits, ctx.tp_group)[0, :vocab].cpu()
        tok = next_token(logits, gen, greedy, temperature, top_k, top_p)
        ids.append(tok)
        if eod is not None and tok == eod:
            break
    return ids[len(prompt_ids):]


SAMPLE_TOKENS = 24  # tokens of a train.sample_interval sample


class SampleHook(TrainingHook):
    """``train.sample_interval=N``: every N steps a short greedy continuation of the
    end-of-document token (:data:`SAMPLE_TOKENS` tokens, no sampling noise, so two
    samples differ only by what the model learnt), printed on the main rank beside the
    metrics and kept in the step's record as ``sample``. Every rank runs the decoding
    (the TP ranks together); it draws from no random generator and the next step puts
    the model back in training mode, so the run's losses are unchanged."""

    def __init__(self, interval: int):
        self.interval = interval

    def setup(self, trainer) -> None:
        cfg, tok = trainer.cfg, trainer.run.tokenizer
        if cfg.model.arch != "gpt":
            raise ConfigError("train.sample_interval is for GPT models (model.arch=gpt)")
        if tok is None:
            raise ConfigError("train.sample_interval needs a tokenizer to print the sample: "
                              "set data.tokenizer_type and data.vocab_file (and "
                              "data.merge_file for GPT-2 BPE), or train.sample_interval=0")
        self.tokenizer = tok

    def describe(self, trainer) -> str:
        return (f"a greedy sample of {SAMPLE_TOKENS} tokens every {self.interval} steps "
                "(train.sample_interval)")

    def step_metrics(self, trainer) -> dict:
        if trainer.step % self.interval:
            return {}
        tok = self.tokenizer
        start = tok.eod if tok.eod is not None else 0
        with torch.no_grad():
            out = generate(trainer.model, trainer.ctx, [start], SAMPLE_TOKENS, greedy=True,
                           eod=tok.eod)
        text = tok.decode(t for t in out if t != tok.eod)
        if trainer.ctx.is_main:
            print(f"sample at step {trainer.step}: {text!r}", flush=True)
        return {"sample": text}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="run dir, checkpoints dir or step folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*",
                   help="section.key=value on top of the run's config.yaml, e.g. "
                   "data.vocab_file=... data.merge_file=... (anywhere on the line)")
    a = parse_args(p, argv)
    path_and_overrides(p, a)

    def body() -> None:
        ckpt = resolve_checkpoint(a.checkpoint)
        cfg = load_config(ckpt / "config.yaml", a.overrides)
        if cfg.model.arch != "gpt":
            raise ConfigError(f"{ckpt}: generation needs a GPT checkpoint (model.arch=gpt)")
        if not names_tokenizer(cfg):
            raise ConfigError(f"{ckpt}/config.yaml names no tokenizer: add the overrides "
                              "data.tokenizer_type=... data.vocab_file=... (and "
                              "data.merge_file=... for GPT-2 BPE)")
        if not a.prompt:
            raise ConfigError("--prompt must not be empty")
        world = read_launch_env().world_size
        cfg.parallel.tensor_parallel_size = world  # heads and hidden must split over it
        unpipelined(cfg)  # a pipelined run's checkpoint loads at PP=1
        cfg.train.global_batch_size = cfg.train.micro_batch_size  # no batches here
        with parallel_session(world, seed=cfg.train.seed) as ctx:
            run = build_run(cfg, ctx, data=False)
            load_checkpoint(ckpt, run.model, ctx)
            tok = run.tokenizer
            with decode_layout(run.model, restore=False):  # the process ends after
                out = generate(run.model, ctx, tok.encode(a.prompt), a.max_new_tokens,
                               a.greedy, a.temperature, a.top_k, a.top_p, a.seed, tok.eod)
            if ctx.is_main:
                print(a.prompt + tok.decode(t for t in out if t != tok.eod))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
