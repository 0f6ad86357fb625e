"""What a checkpoint save costs each rank: sharded (DCP) against the full format 2.

    python bench/checkpoint.py                # GPT-2 124M shape, vocab 4000, TP=2 then TP=4
    python bench/checkpoint.py --vocab 50257  # the real vocab (more memory, longer)

The model (12 layers, hidden 768, 12 heads, seq 1024; the vocab reduced to 4000 by
default, as in issue 35's measurement) is built at TP=2 (2 gloo processes) and at TP=4
(4), fp32, and given Adam state by one optimizer step on random gradients. Per rank,
for each save:

- the peak growth of resident memory during the save (sampled every millisecond) as a
  fraction of the *full* model + Adam state (12 bytes per parameter);
- its wall time (format 2: gather on every TP rank + rank 0's ``torch.save``; format 3:
  every rank writes its share through DCP);
- with ``async_save``, the time the training loop is blocked (the copy of the rank's
  share to host memory) as a fraction of the synchronous save, and the background
  write's time;
- at TP=4, the time to load the TP=2 checkpoints (resharding on load).

Memory figures are RSS, so the allocator's reuse of freed pages can hide a copy (the
sharded saves and loads are measured before the full-form ones for that reason); the
disk is this machine's (page cache included: the figures are not a disk benchmark).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_lite.checkpoint import (  # noqa: E402
    load_checkpoint,
    save_checkpoint,
    wait_for_checkpoint,
)
from megatron_lite.checkpoint.optim_state import full_optimizer_state  # noqa: E402
from megatron_lite.config import load_config  # noqa: E402
from megatron_lite.models import build_model  # noqa: E402
from megatron_lite.parallel import full_state_dict  # noqa: E402
from megatron_lite.training.optim import build_optimizer  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


def save_full_checkpoint(folder: Path, model, ctx, optimizer=None) -> None:
    """Format 2 into ``folder`` (model.pt, optim.pt, written by rank 0 after gathering
    everything on every TP rank): the old writer, the baseline this benchmark measures."""
    model_state = full_state_dict(model, ctx.tp_group)
    optim_state = (full_optimizer_state(model, optimizer, ctx)
                   if optimizer is not None else None)
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model_state, folder / "model.pt")
        if optim_state is not None:
            torch.save(optim_state, folder / "optim.pt")
        meta = {"format_version": 2, "step": 0, "tp_size": ctx.tp_size, "dp_size": ctx.dp_size,
                "world_size": ctx.world_size}
        (folder / "meta.json").write_text(json.dumps(meta) + "\n")
    if dist.is_initialized():
        dist.barrier()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Peak:
    """The peak RSS growth while the ``with`` block runs (a sampling thread)."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss()
        self.done = False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.tick = time.perf_counter()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.tick
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.added = self.peak - self.base


def _setup(ctx, vocab):
    cfg = load_config(None, [
        "model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12",
        "model.seq_length=1024", "model.max_position_embeddings=1024",
        f"model.vocab_size={vocab}", f"parallel.tensor_parallel_size={ctx.tp_size}",
        "train.global_batch_size=1", "train.micro_batch_size=1"])
    model = build_model(cfg.model, ctx)
    opt = build_optimizer(model, cfg.optim, ctx.device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    total = sum(p.numel() * ctx.tp_size if getattr(p, "tp_dim", None) is not None
                else p.numel() for p in model.parameters())
    return cfg, model, opt, total


def _bench(ctx, vocab, root, out_json, load_from):
    cfg, model, opt, total = _setup(ctx, vocab)
    full = 12 * total  # fp32 weights + two fp32 Adam moments, the whole model
    res = {"tp": ctx.tp_size, "params": total}
    root = Path(root)
    # NOTE: the full-form save goes last: the pages it frees stay resident with the
    # allocator and would hide the growth of the saves measured after it
    with Peak() as new:
        save_checkpoint(root / f"run_tp{ctx.tp_size}", 1, model, ctx, cfg, {}, optimizer=opt)
    with Peak() as stall:
        save_checkpoint(root / f"async_tp{ctx.tp_size}", 1, model, ctx, cfg, {},
                        optimizer=opt, async_save=True)
        blocked = time.perf_counter() - stall.tick
        wait_for_checkpoint()
    with Peak() as old:
        save_full_checkpoint(root / f"old_tp{ctx.tp_size}", model, ctx, opt)
    res.update(old_s=old.seconds, old_mem=old.added / full, new_s=new.seconds,
               new_mem=new.added / full, async_blocked_s=blocked,
               async_total_s=stall.seconds, async_mem=stall.added / full)
    if load_from:
        for name, src in (("load_new", Path(load_from) / "run_tp2/checkpoints/step_00000001"),
                          ("load_old", Path(load_from) / "old_tp2")):
            with Peak() as ld:
                load_checkpoint(src, model, ctx, optimizer=opt)
            res[name + "_s"], res[name + "_mem"] = ld.seconds, ld.added / full
    rows = [None] * ctx.world_size
    torch.distributed.all_gather_object(rows, res)
    if ctx.rank == 0:
        Path(out_json).write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tp2 = Path(tmp) / "tp2"
        for tp in (2, 4):
            root = Path(tmp) / f"tp{tp}"
            root.mkdir()
            out = Path(tmp) / f"tp{tp}.json"
            run_distributed(_bench, tp, a.vocab, str(root), str(out),
                            str(tp2) if tp == 4 else None, tp_size=tp)
            rows = json.loads(out.read_text())
            worst = {k: max(r[k] for r in rows) for k in rows[0] if k not in ("tp", "params")}
            print(f"TP={tp} ({rows[0]['params'] / 1e6:.1f}M parameters, vocab {a.vocab}, fp32; "
                  f"worst rank):")
            print(f"  save, format 2 (full): {worst['old_s']:6.2f} s, peak memory added "
                  f"{worst['old_mem']:.2f} of model+Adam")
            print(f"  save, sharded (DCP):   {worst['new_s']:6.2f} s, peak memory added "
                  f"{worst['new_mem']:.2f}")
            print(f"  async save:  training blocked {worst['async_blocked_s']:.2f} s = "
                  f"{worst['async_blocked_s'] / worst['new_s']:.2f} of the sync save; "
                  f"background write done after {worst['async_total_s']:.2f} s; "
                  f"memory added {worst['async_mem']:.2f}")
            if "load_new_s" in worst:
                print(f"  load the TP=2 checkpoint at TP=4: format 2 {worst['load_old_s']:.2f} s "
                      f"(memory {worst['load_old_mem']:.2f}), sharded {worst['load_new_s']:.2f} s "
                      f"(memory {worst['load_new_mem']:.2f})")
            if tp == 4:
                shutil.rmtree(tp2, ignore_errors=True)


if __name__ == "__main__":
    main()
