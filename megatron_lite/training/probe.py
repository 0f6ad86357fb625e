"""Batch sizes decided at start: ``train.global_batch_tokens`` and ``micro_batch_size=auto``.

Popel & Bojar (2018): "batch size should be set as high as possible" — in tokens. So a
run may name its global batch in tokens (resolved to samples, a multiple of
``micro_batch_size x DP``), and let the largest micro-batch that fits be found by trying:
a real forward, backward and optimizer step per candidate (the divisors of the per-rank
batch, binary search), every rank agreeing on each answer. On a GPU a candidate fits when
it runs without running out of memory and its peak (``max_memory_allocated``) stays
under ``1 - MARGIN`` of the device (or ``train.memory_budget``). A CPU has no such
counter and no out-of-memory error short of the OS killing the process, so there the
budget is required, and the peak is measured as what the step holds: parameters,
gradients, optimizer state and every tensor autograd saved for backward. The model,
optimizer and RNG states are put back afterwards: the run starts as if never probed.

What it probes is the step's first shape: BERT's phase 2 (a longer sequence later) and
Transformer-XL's memory (more keys) are not in it; give those a margin or a size.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from megatron_lite.config import ConfigError
from megatron_lite.data.loader import dict_collate, gpt_collate, micro_batches
from megatron_lite.memory import parse_memory, saved_tensor_bytes
from megatron_lite.parallel.comm import MIN, all_reduce
from megatron_lite.parallel.random import rng_state, set_rng_state

MARGIN = 0.1


def parse_budget(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError:
        raise ConfigError(f"train.memory_budget={text!r}: a size like 4GiB, 4G, 4096M") from None


def _held_bytes(params, optimizer, saved: dict) -> int:
    """What a step holds at its peak on CPU: weights, gradients, optimizer state, saved
    activations (distinct storages)."""
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values()
                     if torch.is_tensor(v) and v.dim() > 0)
    return total + sum(saved.values())


def try_micro_batch(trainer, size: int, budget: int | None) -> tuple[bool, int]:
    """One forward + backward + optimizer step at micro-batch ``size`` on this rank:
    ``(fits, peak bytes)``; an out-of-memory error is a no."""
    run, ctx = trainer.run, trainer.ctx
    collate = dict_collate if trainer.cfg.model.arch == "bert" else gpt_collate
    batch = run.to_device(next(micro_batches(run.train_data, 0, size, ctx.dp_rank, ctx.dp_size,
                                             collate)))
    cuda = ctx.device.type == "cuda"
    params = list(trainer.model.parameters())
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
        trainer.engine.train()
        # no_sync: a rank that runs out of memory must not leave the others waiting in
        # DDP's gradient all-reduce (the answers are agreed afterwards)
        local = trainer.engine.no_sync() if hasattr(trainer.engine, "no_sync") else \
            contextlib.nullcontext()
        with local:
            with saved_tensor_bytes(trainer.model) as saved:
                with trainer._autocast():
                    loss = trainer.engine(**batch)
            loss.backward()
        with trainer._fp32(grads=True):  # params_dtype=bf16: masters and main grads
            trainer.optimizer.step()
            peak = torch.cuda.max_memory_allocated(ctx.device) if cuda else \
                _held_bytes(params, trainer.optimizer, saved)
        limit = budget if budget is not None else \
            torch.cuda.get_device_properties(ctx.device).total_memory
        fits = peak <= limit * (1 - MARGIN)
    except torch.OutOfMemoryError:
        fits, peak = False, -1
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    return fits, peak


def probe_micro_batch(trainer) -> str:
    """Find and set ``train.micro_batch_size`` (collective); returns the line to log."""
    cfg, ctx = trainer.cfg, trainer.ctx
    t = cfg.train
    budget = parse_budget(t.memory_budget) if t.memory_budget else None
    if ctx.device.type != "cuda" and budget is None:
        raise ConfigError("train.micro_batch_size=auto on a CPU needs train.memory_budget "
                          "(e.g. 4GiB): a CPU has no out-of-memory error to probe for")
    per_rank = t.global_batch_size // ctx.dp_size
    sizes = [b for b in range(1, per_rank + 1) if per_rank % b == 0]
    # kept on the CPU: a copy on the device would count in every candidate's peak
    with trainer._fp32():
        model_state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    optim_state = copy.deepcopy(trainer.optimizer.state_dict())  # empty before training
    rng = rng_state(ctx.rng)
    best, peaks, lo, hi = None, {}, 0, len(sizes) - 1
    while lo <= hi:  # the largest size that fits, every rank agreeing on each answer
        mid = (lo + hi) // 2
        fits, peaks[sizes[mid]] = try_micro_batch(trainer, sizes[mid], budget)
        world = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        flag = all_reduce(torch.tensor([int(fits)], device=ctx.device), world, MIN)
        if int(flag.item()):
            best, lo = sizes[mid], mid + 1
        else:
            hi = mid - 1
    with trainer._fp32():
        trainer.model.load_state_dict(model_state)
    trainer.optimizer.load_state_dict(optim_state)
    set_rng_state(ctx.rng, rng)
    if best is None:
        limit = f"{budget / 2**30:.2f} GiB" if budget else "the device"
        raise ConfigError(f"train.micro_batch_size=auto: even 1 sample does not fit in {limit} "
                          f"(peak {peaks.get(1, -1) / 2**30:.2f} GiB)")
    t.micro_batch_size = best
    accum = per_rank // best
    where = f"budget {budget / 2**30:.2f} GiB" if budget else str(ctx.device)
    return (f"micro_batch_size=auto: {best} (accumulation {accum}, global batch "
            f"{t.global_batch_size}); peak {peaks[best] / 2**30:.3f} GiB of {where}, tried "
            f"{', '.join(str(b) for b in sorted(peaks))}")
