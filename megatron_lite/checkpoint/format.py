"""Checkpoints that load at any TP/DP layout and resume a run exactly.

``RUN_DIR/checkpoints/step_NNNNNNNN/``:

- ``model.pt``: the full (unsharded) model state dict, vocab padded for the saving TP;
- ``optim.pt``: the full optimizer state *by parameter name* (Adam moments gathered
  like their parameters) and the group hyperparameters: it reshards on load;
- ``rng/rank_NNNNN.pt``: every rank's RNG states (CPU, CUDA, TP-region tracker), used
  when the layout is unchanged, so dropout continues bit for bit;
- ``meta.json`` (format version, step, consumed samples, tokens seen, TP/DP sizes, loss
  scaler) and ``config.yaml``.

Why our own format rather than ``torch.distributed.checkpoint``: the full tensors make
resharding a slice (the vocab padding changes with TP and must be padded or trimmed,
which DCP does not do), the files load anywhere with ``torch.load(weights_only=True)``,
and HF conversion reads the same ``model.pt``. The cost: rank 0 gathers the full
model and optimizer state, fine up to models that fit one host's memory.

A checkpoint is written into a temporary folder, fsynced and renamed into place
(:mod:`megatron_lite.files`); the ``latest`` pointer changes only after that, and only
the newest ``keep`` survive.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.optim_state import full_optimizer_state, load_full_optimizer_state
from megatron_lite.config import Config, save_config
from megatron_lite.files import atomic_write, publish, temp_name
from megatron_lite.parallel import ParallelContext, full_state_dict, load_full_state_dict
from megatron_lite.parallel.random import rng_state, set_rng_state

FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (the message names the file)."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model):
    return getattr(model, "module", model)


def _one_of(optimizer, zero) -> None:
    if optimizer is not None and zero is not None:
        raise TypeError("pass the torch optimizer or the ZeRO engine, not both")


def save_checkpoint(run_dir: Path, step: int, model, ctx: ParallelContext, cfg: Config,
                    extra: dict, *, optimizer=None, zero=None, keep: int = 3,
                    rank_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    Args:
        model: the (unwrapped or DDP-wrapped) model.
        extra: more metadata for ``meta.json`` (consumed samples, loss scaler...).
        optimizer: the DDP engine's torch optimizer, or None (weights only) ...
        zero: ... or the :class:`~megatron_lite.training.zero.ZeroEngine`, whose fp32
            masters and Adam moments are gathered from their DP partitions into the
            same full form, so the checkpoint loads under either engine.
        keep: how many of the newest checkpoints survive.
        rank_state: more of this rank's own state (Transformer-XL memories), saved with
            its RNG states and given back by :func:`load_checkpoint` on the same layout.
    """
    _one_of(optimizer, zero)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = temp_name(final)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    if zero is not None:
        model_state, optim_state = zero.checkpoint_state()
    else:
        model_state = full_state_dict(_unwrap(model), ctx.tp_group)  # collectives over TP
        optim_state = (full_optimizer_state(_unwrap(model), optimizer, ctx)
                       if optimizer is not None else None)
    torch.save({**rng_state(ctx.rng), **(rank_state or {})},
               tmp / "rng" / f"rank_{ctx.rank:05d}.pt")
    if ctx.is_main:
        torch.save(model_state, tmp / "model.pt")
        if optim_state is not None:
            torch.save(optim_state, tmp / "optim.pt")
        save_config(cfg, tmp / "config.yaml")
        meta = {"format_version": FORMAT_VERSION, "step": step, "tp_size": ctx.tp_size,
                "dp_size": ctx.dp_size, "world_size": ctx.world_size, **extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _barrier()
    if ctx.is_main:
        publish(tmp, final)  # fsync, rename (an old copy of the step is replaced safely)
        with atomic_write(root / "latest") as f:  # the pointer moves only after that
            f.write(final.name + "\n")
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and stale temporaries)."""
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    # left by a killed save (".tmp_step_*": the name before megatron_lite.files)
    for pattern in (temp_name("step_*").name, ".tmp_step_*"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a ``checkpoints/`` folder or a run folder (via latest)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if (p / "model.pt").is_file():
        return p
    raise FileNotFoundError(f"{p}: no checkpoint here (expected model.pt or a latest pointer)")


def load_file(path: Path, map_location="cpu"):
    """``torch.load`` of a checkpoint file (tensors only); one-line errors naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint?)") from None
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: unreadable or corrupt ({str(err).splitlines()[0]})") \
            from None


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt / 'meta.json'}: unreadable ({err})") from None


def load_checkpoint(path: str | Path, model, ctx: ParallelContext, *, optimizer=None,
                    zero=None, restore_rng: bool = False) -> dict:
    """Load weights (and optimizer state) at any TP/DP layout; return the metadata.

    Args:
        path: a checkpoint folder, its ``checkpoints/`` folder or its run folder.
        model: the (unwrapped or DDP-wrapped) model.
        optimizer: a torch optimizer to restore, or None (weights only) ...
        zero: ... or a :class:`~megatron_lite.training.zero.ZeroEngine` (DeepSpeed's
            partitioned masters and moments).
        restore_rng: with an unchanged layout, restore every rank's RNG states too (exact
            resume) and return the rest of its saved state as ``meta["rank_state"]``; with
            a changed layout they cannot be matched, and a warning says so.
    """
    _one_of(optimizer, zero)
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    model_state = load_file(ckpt / "model.pt")
    try:
        load_full_state_dict(_unwrap(model), model_state, ctx.tp_group)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{ckpt}/model.pt: cannot load into this model ({err})") from None
    if optimizer is not None or zero is not None:
        has_optim = (ckpt / "optim.pt").exists()
        optim_state = load_file(ckpt / "optim.pt") if has_optim else None
        try:
            if zero is not None:  # the masters come from model.pt, the moments if saved
                zero.load_checkpoint_state(model_state, optim_state)
            elif has_optim:
                load_full_optimizer_state(_unwrap(model), optimizer, optim_state, ctx)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{ckpt}/optim.pt: does not fit ({err})") from None
        if not has_optim and ctx.is_main:
            print(f"warning: {ckpt} has no optimizer state; Adam restarts from zero moments",
                  flush=True)
    if restore_rng:
        same = meta.get("world_size") == ctx.world_size and meta.get("tp_size") == ctx.tp_size
        if same and (ckpt / "rng").is_dir():
            state = load_file(ckpt / "rng" / f"rank_{ctx.rank:05d}.pt")
            set_rng_state(ctx.rng, state)
            meta["rank_state"] = {k: v for k, v in state.items()
                                  if k not in ("cpu", "cuda", "tracker")}
        elif ctx.is_main:
            print(f"warning: {ckpt} was saved at TP={meta.get('tp_size')} x "
                  f"DP={meta.get('dp_size')}; dropout RNG streams are reseeded (and any "
                  "Transformer-XL memory starts empty), so the continuation is not bitwise "
                  "identical", flush=True)
    return meta


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else []
