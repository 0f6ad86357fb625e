"""Checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNNN/`` plus a ``latest`` pointer.

Layout: ``model.pt`` (the full, unsharded state dict: it loads at any TP size),
``optim_tp{r}.pt`` per TP rank (optimizer state of this rank's shards; DP ranks hold
identical copies, so DP rank 0 writes), ``meta.json`` (step, consumed samples, layout)
and ``config.yaml``. A checkpoint is written into a temporary folder and renamed into
place; ``latest`` changes only after that. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lite.config import Config, save_config
from megatron_lite.parallel import ParallelContext, full_state_dict, load_full_state_dict

FORMAT_VERSION = 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model):
    return getattr(model, "module", model)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, ctx: ParallelContext,
                    cfg: Config, extra: dict) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = full_state_dict(_unwrap(model), ctx.tp_group)  # collective over TP
    if ctx.is_main:
        torch.save(state, tmp / "model.pt")
        save_config(cfg, tmp / "config.yaml")
        meta = {"format_version": FORMAT_VERSION, "step": step, "tp_size": ctx.tp_size,
                "dp_size": ctx.dp_size, **extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if ctx.dp_rank == 0 and optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / f"optim_tp{ctx.tp_rank}.pt")
    _barrier()
    if ctx.is_main:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = root / f".old_step_{step:08d}"
        if final.exists():  # re-saving a step: move the old copy aside, never delete first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name + "\n")
        os.replace(root / "latest.tmp", root / "latest")
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a ``checkpoints/`` folder or a run folder (via latest)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if (p / "model.pt").is_file():
        return p
    raise FileNotFoundError(f"{p}: no checkpoint here (expected model.pt or a latest pointer)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (the message names the file)."""


def load_checkpoint(path: str | Path, model, optimizer, ctx: ParallelContext) -> dict:
    """Load weights (any TP size) and, at the same TP size, the optimizer; return meta."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
        load_full_state_dict(_unwrap(model), state, ctx.tp_group)
    except (KeyError, ValueError, RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"{ckpt}: cannot load into this model ({err})") from None
    optim_file = ckpt / f"optim_tp{ctx.tp_rank}.pt"
    if optimizer is not None:
        if meta["tp_size"] == ctx.tp_size and optim_file.exists():
            optimizer.load_state_dict(torch.load(optim_file, map_location=ctx.device,
                                                 weights_only=True))
        elif ctx.is_main:
            print(f"warning: {ckpt}: no optimizer state for TP={ctx.tp_size} (saved at "
                  f"TP={meta['tp_size']}); Adam restarts from zero moments", flush=True)
    return meta
