"""Checkpoints that load at any TP/DP layout and resume a run exactly.

``RUN_DIR/checkpoints/step_NNNNNNNN/`` (format 3, sharded):

- ``.metadata`` and ``__RANK_0.distcp``: the model and its optimizer state written through
  ``torch.distributed.checkpoint`` (DCP), each rank its own pieces: its TP shard of every
  parameter, split with the other DP replicas (or its ZeRO partition), nothing twice.
  Stored names are ``model/<param>`` and ``optim/<param>/<exp_avg|exp_avg_sq...>`` at a
  global shape that does not depend on TP (the vocab unpadded; fused ``[Q|K|V]`` weights
  viewed as (3, n/3, ...), see :mod:`.sharded`), so they reshard on load: each rank
  reads the boxes its own shard needs, at any TP/DP size and under either engine;
- ``optim_groups.pt``: the optimizer's group hyperparameters and per-parameter step
  counters (plain data, ``torch.load(weights_only=True)``);
- ``rng/rank_NNNNN.pt``: every rank's RNG states (CPU, CUDA, TP-region tracker) and its
  own state (Transformer-XL memories), used when the layout is unchanged, so dropout
  continues bit for bit;
- ``meta.json`` (format version, step, consumed samples, tokens seen, TP/DP sizes, loss
  scaler, the plain shapes of viewed tensors) and ``config.yaml``.

Why DCP rather than our own full-tensor files (format 2, which still loads): gathering the
full model and Adam state made every TP rank hold it all while saving (0.97 of it per
rank at TP=4) and rank 0 write it alone; with DCP each rank writes and reads only its
share, in parallel. What format 2 gave stays: resharding at any TP (DCP reshards boxes;
the TP-dependent vocab padding is cut on save and zero-filled on load), loads that never
unpickle code (tensors through ``weights_only``, DCP's pickled ``.metadata`` through an
allow-list unpickler), and one full file for sharing: ``python -m megatron_lite.checkpoint
consolidate CKPT --output DIR`` writes ``model.safetensors``, which loads and converts
(HF) like any checkpoint.

A save writes into a temporary folder; the ``latest`` pointer moves only after every
rank's write is complete and the folder is fsynced and renamed (:mod:`megatron_lite.files`),
and only the newest ``keep`` survive. With ``async_save`` the state is copied to host
memory (the rank's share) and written by a background thread while training goes on; at
most one save is in flight (the next one, a load, and :func:`wait_for_checkpoint` wait for
it), and pruning runs after the publish, so it never meets a folder being written.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import shutil
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lite.checkpoint.optim_state import (
    group_hyperparameters,
    load_full_optimizer_state,
    load_group_hyperparameters,
    step_on_device,
)
from megatron_lite.checkpoint.sharded import (
    Piece,
    UnsafeCheckpoint,
    pieces,
    placement,
    read_full,
    read_pieces,
    share,
    stored_tensors,
    write_pieces,
)
from megatron_lite.config import Config, save_config
from megatron_lite.files import atomic_write, publish, temp_name, written_dir
from megatron_lite.parallel import ParallelContext, load_full_state_dict
from megatron_lite.parallel.random import rng_state, set_rng_state

FORMAT_VERSION = 3
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL, OPTIM = "model/", "optim/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (the message names the file)."""


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _unwrap(model):
    return getattr(model, "module", model)


def _one_of(optimizer, zero) -> None:
    if optimizer is not None and zero is not None:
        raise TypeError("pass the torch optimizer or the ZeRO engine, not both")


# ---------------------------------------------------------------------------- what a rank writes


def _owner(t: torch.Tensor, ctx: ParallelContext) -> tuple[int, int]:
    """(index, count) of this rank among the ranks holding the same copy of ``t``: its
    pipeline stage's ranks (all ranks without pipelining)."""
    if getattr(t, "tp_dim", None) is None:  # replicated on every rank of the stage
        return ctx.tp_rank + ctx.tp_size * ctx.dp_rank, ctx.tp_size * ctx.dp_size
    return ctx.dp_rank, ctx.dp_size  # one TP shard, replicated over DP


def _replica_pieces(fqn: str, p: torch.Tensor, value: torch.Tensor, ctx: ParallelContext,
                    vocab_size: int | None) -> list[Piece]:
    """This rank's share of a tensor shaped like ``p`` that its replicas hold too."""
    where = placement(p, tuple(value.shape), ctx.tp_rank, ctx.tp_size, vocab_size)
    index, count = _owner(p, ctx)
    return pieces(fqn, value.detach(), where, *share(math.prod(where.view), index, count))


def _own_copy(value, device):
    """A scalar of the optimizer state as a tensor of its own (a step counter shared by
    the parameters of a ZeRO group must not become one counter stepped N times)."""
    return value.to(device, copy=True) if torch.is_tensor(value) else value


def _tensor_state(entry: dict, like: torch.Tensor) -> tuple[dict, dict]:
    """An optimizer state entry split into (tensors shaped like ``like``, copies of the
    rest: scalars such as Adam's step)."""
    tensors = {k: v for k, v in entry.items() if torch.is_tensor(v) and v.shape == like.shape
               and v.dim() > 0}
    return tensors, {k: _own_copy(v, "cpu") for k, v in entry.items() if k not in tensors}


def _save_items(model, ctx, vocab_size, optimizer, zero) -> tuple[list[Piece], dict, dict]:
    """(this rank's pieces, the plain shapes of viewed tensors, per-parameter scalars)."""
    items, shapes, scalars = [], {}, {}

    def note(fqn, p):
        where = placement(p, tuple(p.shape), ctx.tp_rank, ctx.tp_size, vocab_size)
        if where.global_shape != where.full_shape:
            shapes[fqn] = list(where.full_shape)

    held = set()
    if zero is not None:
        for flat, params, _ in zero.internals.partitions():
            tensors, rest = _tensor_state(zero.base.state.get(flat, {}), flat)
            for p in params:
                name = zero.names[id(p)]
                held.add(name)
                scalars[name] = rest
                note(MODEL + name, p)
                for key in tensors:
                    note(f"{OPTIM}{name}/{key}", p)
                where = zero.internals.fragment(p)
                if where is None or (getattr(p, "tp_dim", None) is None and ctx.tp_rank):
                    continue  # a replicated parameter: TP rank 0's partitions write it
                if getattr(p, "pipeline_copy", False):
                    continue  # the last stage's copy of the tied embedding: the first's
                start, flat_start, n = where
                plc = placement(p, tuple(p.shape), ctx.tp_rank, ctx.tp_size, vocab_size)
                for fqn, src in ((MODEL + name, flat), *((f"{OPTIM}{name}/{k}", v)
                                                         for k, v in tensors.items())):
                    items += pieces(fqn, p, plc, start, start + n,
                                    flat=src.narrow(0, flat_start, n))
    m = _unwrap(model)
    for name, p in [*m.named_parameters(), *m.named_buffers()]:
        if getattr(p, "pipeline_copy", False):
            continue  # the last stage's copy of the tied embedding: the first saves it
        if name not in held:
            note(MODEL + name, p)
            items += _replica_pieces(MODEL + name, p, p, ctx, vocab_size)
    if optimizer is not None:
        names = {id(p): n for n, p in m.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if getattr(p, "pipeline_copy", False):
                    continue
                tensors, rest = _tensor_state(optimizer.state.get(p, {}), p)
                scalars[names[id(p)]] = rest
                for key, value in tensors.items():
                    fqn = f"{OPTIM}{names[id(p)]}/{key}"
                    note(fqn, p)
                    items += _replica_pieces(fqn, p, value, ctx, vocab_size)
    return items, shapes, scalars


# ---------------------------------------------------------------------------- async saves

_GROUP: list = [None, None]  # (the default group it belongs to, a gloo group for saves)


def _save_group():
    """A gloo group of all ranks for the checkpoint's own collectives, so a background
    save never shares a communicator with training (created on first use: collective)."""
    if not dist.is_initialized():
        return None
    if _GROUP[0] is not dist.group.WORLD:
        _GROUP[:] = [dist.group.WORLD, dist.new_group(backend="gloo")]
    return _GROUP[1]


class _Pending:
    def __init__(self, target, final: Path):
        self.final, self.error = final, None

        def run():
            try:
                target()
            except BaseException as err:  # re-raised by wait_for_checkpoint
                self.error = err

        self.thread = threading.Thread(target=run, name=f"save {final.name}", daemon=True)
        self.thread.start()


_PENDING: list[_Pending] = []


def wait_for_checkpoint() -> Path | None:
    """Block until the save in flight (if any) is published; return its folder.

    Raises:
        CheckpointError: the background save failed (``latest`` did not move).
    """
    if not _PENDING:
        return None
    pending = _PENDING.pop()
    pending.thread.join()
    if pending.error is not None:
        raise CheckpointError(f"{pending.final}: the background save failed "
                              f"({_one_line(pending.error)})")
    return pending.final


def save_checkpoint(run_dir: Path, step: int, model, ctx: ParallelContext, cfg: Config,
                    extra: dict, *, optimizer=None, zero=None, keep: int = 3,
                    rank_state: dict | None = None, async_save: bool = False) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder (with
    ``async_save``, the folder it will be once the background write is published).

    Args:
        model: the (unwrapped or DDP-wrapped) model.
        extra: more metadata for ``meta.json`` (consumed samples, loss scaler...).
        optimizer: the DDP engine's torch optimizer, or None (weights only) ...
        zero: ... or what shards the optimizer over DP (the
            :class:`~megatron_lite.training.zero.ZeroEngine`, or the
            :class:`~megatron_lite.training.distopt.DistributedOptimizer`: both expose
            ``internals.partitions()``/``fragment(p)``, ``base`` and ``names``): each DP
            rank writes its partitions of the fp32 masters (as the model) and Adam moments.
        keep: how many of the newest checkpoints survive.
        rank_state: more of this rank's own state (Transformer-XL memories), saved with
            its RNG states and given back by :func:`load_checkpoint` on the same layout.
        async_save: copy this rank's pieces to host memory and write them in the
            background; training goes on (:func:`wait_for_checkpoint` waits for it).
    """
    _one_of(optimizer, zero)
    wait_for_checkpoint()  # at most one in flight
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = temp_name(final)
    group = _save_group()

    def make_folder():
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)

    _together(make_folder, tmp, final, group)  # also the barrier before anyone writes
    items, shapes, scalars = _save_items(model, ctx, cfg.model.vocab_size, optimizer, zero)
    if ctx.pp_size > 1:  # each stage knows its own layers': the main rank writes them all
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, (shapes, scalars), group=group)
        for their_shapes, their_scalars in parts:
            shapes.update(their_shapes)
            scalars.update(their_scalars)
    if async_save:  # a copy of this rank's share: training may change the tensors now
        for it in items:
            it.tensor = it.tensor.to("cpu", copy=True)
    def write_small_files():
        torch.save({**rng_state(ctx.rng), **(rank_state or {})},
                   tmp / "rng" / f"rank_{ctx.rank:05d}.pt")
        if ctx.is_main:
            base = zero.base if zero is not None else optimizer
            if base is not None:
                torch.save({"param_groups": group_hyperparameters(base), "scalars": scalars},
                           tmp / "optim_groups.pt")
            save_config(cfg, tmp / "config.yaml")
            meta = {"format_version": FORMAT_VERSION, "step": step, "tp_size": ctx.tp_size,
                    "dp_size": ctx.dp_size, "pp_size": ctx.pp_size,
                    "world_size": ctx.world_size, **extra, "full_shapes": shapes}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    _together(write_small_files, tmp, final, group)

    def publish_on_main():
        if ctx.is_main:
            publish(tmp, final)  # fsync, rename (an old copy of the step is replaced safely)
            with atomic_write(root / "latest") as f:  # the pointer moves only after that
                f.write(final.name + "\n")
            _prune(root, keep)

    def write_and_publish():
        with _removed_on_failure(tmp, final):
            write_pieces(tmp, items, group)  # collective over the save group; .metadata last
        _barrier(group)
        _together(publish_on_main, tmp, final, group)

    if async_save:
        _PENDING.append(_Pending(write_and_publish, final))
    else:
        write_and_publish()
    return final


def _together(step, tmp: Path, final: Path, group) -> None:
    """Run one step of a save on every rank, then agree (collective) on whether it worked:
    a rank whose write failed raises its own :class:`SaveFailed` line, and every other
    rank raises one naming that rank, instead of waiting for it in the next collective."""
    error = None
    try:
        with _removed_on_failure(tmp, final, remove=False):  # peers may still write there
            step()
    except SaveFailed as err:
        error = err
    if dist.is_initialized():
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, None if error is None else str(error), group=group)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    else:
        failed = [(0, str(error))] if error is not None else []
    if failed:
        shutil.rmtree(tmp, ignore_errors=True)  # every rank is done with it now
    if error is not None:
        raise error
    if failed:
        rank, _ = failed[0]
        raise SaveFailed(f"{final}: the checkpoint could not be written: rank {rank} failed "
                         "(its own error line says why); the last complete checkpoint is "
                         "kept")


class SaveFailed(OSError):
    """A checkpoint that could not be written (a full disk...): its partial temporary
    folder is removed and ``latest`` still names the previous checkpoint. An ``OSError``,
    so every rank says its own (one line each)."""


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, final: Path, remove: bool = True):
    """A write of the save that fails (``OSError``, or DCP's ``CheckpointException``
    wrapping one) removes the temporary folder (unless ``remove`` is false: the caller
    removes it once no rank writes there) and becomes one :class:`SaveFailed` line."""
    try:
        yield
    except (OSError, CheckpointException) as err:
        if isinstance(err, SaveFailed):
            raise
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"; {shutil.disk_usage(tmp.parent).free / 2**30:.2f} GiB free there"
        except OSError:
            free = ""
        raise SaveFailed(f"{final}: the checkpoint could not be written ({_one_line(err)}); "
                         f"its partial temporary folder {tmp.name} was removed and the last "
                         f"complete checkpoint is kept{free}") from None


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and stale temporaries;
    called only by the save that just published, the only one in flight)."""
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    # left by a killed save (".tmp_step_*": the name before megatron_lite.files)
    for pattern in (temp_name("step_*").name, ".tmp_step_*"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------- reading


def _kind(ckpt: Path) -> str | None:
    if (ckpt / ".metadata").is_file():
        return "sharded"
    if (ckpt / "model.safetensors").is_file() and (ckpt / "meta.json").is_file():
        return "consolidated"
    if (ckpt / "model.pt").is_file():
        return "full"
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a ``checkpoints/`` folder or a run folder (via latest)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if _kind(p) is not None:
        return p
    raise FileNotFoundError(f"{p}: no checkpoint here (expected .metadata, model.safetensors, "
                            "model.pt or a latest pointer)")


def _one_line(err: BaseException) -> str:
    if isinstance(err, CheckpointException):  # DCP's: {rank: (exception, traceback)}
        inner = next(iter(err.failures.values()), None)
        err = inner[0] if isinstance(inner, tuple) else (inner or err)
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _torch_load(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint?)") from None
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: unreadable or corrupt ({_one_line(err)})") from None


def _dcp_call(ckpt: Path, fn, *args):
    """``fn(*args)`` with DCP's and the reader's errors as one-line CheckpointErrors."""
    try:
        return fn(*args)
    except FileNotFoundError as err:
        raise CheckpointError(f"{ckpt}: {Path(err.filename or '').name or 'a file'} missing "
                              "(incomplete checkpoint?)") from None
    except UnsafeCheckpoint as err:
        raise CheckpointError(f"{ckpt}/.metadata: refused, not plain DCP metadata "
                              f"({err})") from None
    except (KeyError, ValueError):
        raise
    except (Exception, CheckpointException) as err:  # DCP wraps what its readers raise
        inner = _one_line(err)
        if "refused" in inner or "pickled object" in inner:
            raise CheckpointError(f"{ckpt}: refused, not plain DCP data ({inner})") from None
        raise CheckpointError(f"{ckpt}: a .distcp/.metadata file is unreadable or corrupt "
                              f"({inner})") from None


def _full_form(ckpt: Path) -> tuple[dict, dict | None]:
    """(full model state, full optimizer state or None) of a format-3 checkpoint, in the
    form of format 2 (``optim_state.full_optimizer_state``), vocab unpadded."""
    groups = _torch_load(ckpt / "optim_groups.pt") if (ckpt / "optim_groups.pt").is_file() \
        else None
    if _kind(ckpt) == "sharded":
        shapes = read_meta(ckpt).get("full_shapes", {})
        stored = _dcp_call(ckpt, read_full, ckpt)
        stored = {k: v.reshape(shapes[k]) if k in shapes else v for k, v in stored.items()}
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            stored = load_safetensors(ckpt / "model.safetensors")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{ckpt}/model.safetensors: unreadable or corrupt "
                                  f"({_one_line(err)})") from None
    model = {k[len(MODEL):]: v for k, v in stored.items() if k.startswith(MODEL)}
    if groups is None:
        return model, None
    state = {name: {k: _own_copy(v, "cpu") for k, v in rest.items()}
             for name, rest in groups["scalars"].items()}
    for k, v in stored.items():
        if k.startswith(OPTIM):
            name, key = k[len(OPTIM):].rsplit("/", 1)
            state.setdefault(name, {})[key] = v
    return model, {"state": state, "param_groups": groups["param_groups"]}


def load_file(path: Path, map_location="cpu"):
    """``torch.load`` of a checkpoint file (tensors only); one-line errors naming the file.

    ``CKPT/model.pt`` and ``CKPT/optim.pt`` of a format-3 (sharded or consolidated)
    checkpoint are its full model state and full optimizer state, assembled (vocab
    unpadded): what format 2 stored in those files.
    """
    path = Path(path)
    if path.name in ("model.pt", "optim.pt") and not path.exists() and \
            _kind(path.parent) in ("sharded", "consolidated"):
        model, optim = _full_form(path.parent)
        if path.name == "model.pt":
            return model
        if optim is None:
            raise CheckpointError(f"{path.parent}: no optimizer state saved")
        return optim
    return _torch_load(path, map_location)


def has_optimizer_state(ckpt: Path) -> bool:
    return (Path(ckpt) / "optim.pt").is_file() or (Path(ckpt) / "optim_groups.pt").is_file()


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt / 'meta.json'}: unreadable ({err})") from None


def _load_sharded(ckpt: Path, model, ctx: ParallelContext, optimizer, zero) -> bool:
    """Read this rank's pieces of a sharded checkpoint into the model (and optimizer or
    ZeRO partitions); returns whether optimizer state was saved."""
    stored = _dcp_call(ckpt, stored_tensors, ckpt)
    m = _unwrap(model)
    own = dict(m.named_parameters()) | dict(m.named_buffers())
    saved = {k[len(MODEL):] for k in stored if k.startswith(MODEL)}
    # a pipeline stage holds some of the model: its names are the whole model's
    expected = getattr(m, "global_names", None) or set(own)
    missing, extra = sorted(set(own) - saved), sorted(saved - expected)
    if missing or extra:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    has_optim = (ckpt / "optim_groups.pt").is_file()
    groups = _torch_load(ckpt / "optim_groups.pt") if has_optim else None
    targets: list[Piece] = []

    def where(fqn, p):
        vdim = getattr(p, "vocab_dim", None)
        vocab = stored[fqn][0][vdim] if vdim is not None else None
        plc = placement(p, tuple(p.shape), ctx.tp_rank, ctx.tp_size, vocab)
        if plc.global_shape != stored[fqn][0]:
            raise ValueError(f"{fqn[len(MODEL):] if fqn.startswith(MODEL) else fqn}: saved "
                             f"shape {stored[fqn][0]} does not fit {plc.global_shape}")
        if vdim is not None and plc.view[vdim] * (ctx.tp_size if getattr(
                p, "tp_dim", None) == vdim else 1) < vocab:
            raise ValueError(f"{fqn}: saved vocab {vocab} is larger than this model's")
        return plc

    def whole(fqn, p, dest):
        plc = where(fqn, p)
        if plc.extent != plc.view:
            dest.zero_()  # the vocab padding: not stored
        targets.extend(pieces(fqn, dest, plc))

    with torch.no_grad():
        for name, p in own.items():
            whole(MODEL + name, p, p.data)
        names = {id(p): n for n, p in m.named_parameters()}

        def keys_of(name):
            prefix = f"{OPTIM}{name}/"
            return [k[len(prefix):] for k in stored if k.startswith(prefix)]

        if optimizer is not None and has_optim:
            on_device = step_on_device(optimizer)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    name = names[id(p)]
                    if name not in groups["scalars"] and not keys_of(name):
                        raise KeyError(f"no optimizer state for {name}")
                    entry = {}
                    for key in keys_of(name):
                        entry[key] = torch.empty(p.shape, dtype=stored[f"{OPTIM}{name}/{key}"][1],
                                                 device=p.device)
                        whole(f"{OPTIM}{name}/{key}", p, entry[key])
                    for key, value in groups["scalars"].get(name, {}).items():
                        entry[key] = _own_copy(value, p.device if on_device else "cpu")
                    optimizer.state[p] = entry
            load_group_hyperparameters(optimizer, groups["param_groups"])
        if zero is not None:
            on_device = step_on_device(zero.base)
            for flat, params, _ in zero.internals.partitions():
                state = zero.base.state[flat] if has_optim else {}
                for p in params:
                    name = zero.names[id(p)]
                    dests = {MODEL + name: flat}
                    if has_optim:
                        if name not in groups["scalars"] and not keys_of(name):
                            raise KeyError(f"no optimizer state for {name}")
                        for key in keys_of(name):
                            if key not in state:
                                state[key] = torch.zeros_like(flat)
                            dests[f"{OPTIM}{name}/{key}"] = state[key]
                        for key, value in groups["scalars"].get(name, {}).items():
                            state[key] = _own_copy(value, flat.device if on_device else "cpu")
                    frag = zero.internals.fragment(p)
                    if frag is None:
                        continue
                    start, flat_start, n = frag
                    for fqn, dest in dests.items():
                        plc = where(fqn, p)
                        part = dest.narrow(0, flat_start, n)
                        if plc.extent != plc.view:
                            part.zero_()
                        targets.extend(pieces(fqn, p, plc, start, start + n, flat=part))
            if has_optim:
                load_group_hyperparameters(zero.base, groups["param_groups"])
        _dcp_call(ckpt, read_pieces, ckpt, targets)
    return has_optim


def load_checkpoint(path: str | Path, model, ctx: ParallelContext, *, optimizer=None,
                    zero=None, restore_rng: bool = False) -> dict:
    """Load weights (and optimizer state) at any TP/DP layout; return the metadata.

    Reads format 3 (sharded: each rank reads only its pieces; or consolidated) and
    format 2 (full ``model.pt``/``optim.pt``).

    Args:
        path: a checkpoint folder, its ``checkpoints/`` folder or its run folder.
        model: the (unwrapped or DDP-wrapped) model.
        optimizer: a torch optimizer to restore, or None (weights only) ...
        zero: ... or a :class:`~megatron_lite.training.zero.ZeroEngine` (DeepSpeed's
            partitioned masters and moments) or a
            :class:`~megatron_lite.training.distopt.DistributedOptimizer` (its DP slices).
        restore_rng: with an unchanged layout, restore every rank's RNG states too (exact
            resume) and return the rest of its saved state as ``meta["rank_state"]``; with
            a changed layout they cannot be matched, and a warning says so.
    """
    _one_of(optimizer, zero)
    wait_for_checkpoint()  # a save of this process still in flight
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if _kind(ckpt) == "sharded":
        try:
            has_optim = _load_sharded(ckpt, model, ctx, optimizer, zero)
        except (KeyError, ValueError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{ckpt}: cannot load into this model "
                                  f"({str(err).strip(chr(39))})") from None
    else:
        has_optim = _load_full(ckpt, model, ctx, optimizer, zero)
    if (optimizer is not None or zero is not None) and not has_optim and ctx.is_main:
        print(f"warning: {ckpt} has no optimizer state; Adam restarts from zero moments",
              flush=True)
    if restore_rng:
        same = meta.get("world_size") == ctx.world_size and meta.get("tp_size") == ctx.tp_size \
            and meta.get("pp_size", 1) == ctx.pp_size
        rng_file = ckpt / "rng" / f"rank_{ctx.rank:05d}.pt"
        if same and rng_file.is_file():
            state = _torch_load(rng_file)
            set_rng_state(ctx.rng, state)
            meta["rank_state"] = {k: v for k, v in state.items()
                                  if k not in ("cpu", "cuda", "tracker")}
        elif same and (ctx.is_main or rng_file.parent.is_dir()):
            # the layout is the same: the RNG states are what is missing (no rng/ folder
            # at all: the main rank says it once; one rank's file: that rank)
            what = (f"{rng_file} is missing" if rng_file.parent.is_dir() else
                    f"{ckpt} has no rng/ folder (the ranks' RNG states)")
            print(f"warning{f' (rank {ctx.rank})' if ctx.rank else ''}: {what}: dropout RNG "
                  "streams are reseeded (and any Transformer-XL memory starts empty), so "
                  "the continuation is not bitwise identical", flush=True)
        elif not same and ctx.is_main:
            print(f"warning: {ckpt} was saved at TP={meta.get('tp_size')} x "
                  f"DP={meta.get('dp_size')} x PP={meta.get('pp_size', 1)}; dropout RNG "
                  "streams are reseeded (and any "
                  "Transformer-XL memory starts empty), so the continuation is not bitwise "
                  "identical", flush=True)
    return meta


def _load_full(ckpt: Path, model, ctx: ParallelContext, optimizer, zero) -> bool:
    """Format 2 (``model.pt``, ``optim.pt``) or a consolidated checkpoint: every rank
    reads the full tensors and keeps its slice."""
    if _kind(ckpt) == "consolidated":
        model_state, optim_state = _full_form(ckpt)
        model_file, optim_file = ckpt / "model.safetensors", ckpt / "optim_groups.pt"
    else:
        model_file, optim_file = ckpt / "model.pt", ckpt / "optim.pt"
        model_state = _torch_load(model_file)
        optim_state = None
        if (optimizer is not None or zero is not None) and optim_file.exists():
            optim_state = _torch_load(optim_file)
    try:
        load_full_state_dict(_unwrap(model), model_state, ctx.tp_group)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{model_file}: cannot load into this model ({err})") from None
    if optimizer is None and zero is None:
        return False
    try:
        if zero is not None:  # the masters come from the model state, the moments if saved
            zero.load_checkpoint_state(model_state, optim_state)
        elif optim_state is not None:
            load_full_optimizer_state(_unwrap(model), optimizer, optim_state, ctx)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{optim_file}: does not fit ({err})") from None
    return optim_state is not None


def consolidate(src: str | Path, out: Path) -> Path:
    """One process: write the full form of checkpoint ``src`` to ``out``:
    ``model.safetensors`` (``model/<param>`` and ``optim/<param>/<key>``, vocab unpadded,
    fused weights whole), ``optim_groups.pt``, ``meta.json``, ``config.yaml``."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(src)
    model, optim = (_full_form(ckpt) if _kind(ckpt) != "full" else
                    (load_file(ckpt / "model.pt"),
                     load_file(ckpt / "optim.pt") if (ckpt / "optim.pt").is_file() else None))
    tensors = {MODEL + k: v.contiguous() for k, v in model.items()}
    scalars = {}
    if optim is not None:
        for name, entry in optim["state"].items():
            scalars[name] = {}
            for key, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    tensors[f"{OPTIM}{name}/{key}"] = v.contiguous()
                else:
                    scalars[name][key] = v
    meta = dict(read_meta(ckpt), format_version=FORMAT_VERSION, consolidated_from=str(ckpt))
    meta.pop("full_shapes", None)
    with written_dir(out) as tmp:
        save_file(tensors, tmp / "model.safetensors")
        if optim is not None:
            torch.save({"param_groups": optim["param_groups"], "scalars": scalars},
                       tmp / "optim_groups.pt")
        shutil.copy(ckpt / "config.yaml", tmp / "config.yaml")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else []
