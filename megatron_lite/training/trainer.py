"""The training loop: build -> (load) -> train with accumulation, clipping, eval, logging, save.

What a variant adds to training comes in through :class:`~megatron_lite.hooks.TrainingHook`s
(the model's own, :func:`~megatron_lite.hooks.model_hooks`, and a command's): the loop
names none of them.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    wait_for_checkpoint,
)
from megatron_lite.config import Config, ConfigError, load_config, save_config
from megatron_lite.files import FolderInUse, FolderLock
from megatron_lite.generate import SampleHook
from megatron_lite.hooks import TrainingHook, model_hooks
from megatron_lite.models.registry import describe_parts
from megatron_lite.parallel import ParallelContext
from megatron_lite.run import build_run, error_sync
from megatron_lite.training.compile import compile_model
from megatron_lite.training.distopt import DistributedOptimizer
from megatron_lite.training.evaluation import evaluate, validation_metrics
from megatron_lite.training.interrupt import Interrupt
from megatron_lite.training.metrics import (
    MetricsLogger,
    check_wandb,
    model_flops_per_step,
    peak_flops,
)
from megatron_lite.training.mixed import MainParams
from megatron_lite.training.optim import build_optimizer, clip_grads_
from megatron_lite.training.pipeline import PipelineEngine, pipelined_build
from megatron_lite.training.precision import DynamicLossScaler, autocast
from megatron_lite.training.probe import probe_micro_batch
from megatron_lite.training.schedule import schedule_of, scheduled_lr
from megatron_lite.training.zero import ZeroEngine


class TrainingDiverged(ValueError):
    """The divergence guard gave up (one line: the step, why, how many recoveries)."""


class Trainer:
    """One run. ``Trainer(cfg, ctx).fit()`` trains ``train.max_steps`` optimizer steps.

    The model and data come from :func:`megatron_lite.run.build_run` (``self.run``); the
    Trainer owns the optimizer, the engine, checkpoints, metrics and the loop, and calls
    its hooks (``self.hooks``) at the points :class:`~megatron_lite.hooks.TrainingHook`
    names.

    Args:
        cfg: the config, resolved in place (:mod:`megatron_lite.resolve`) and saved as
            the run's ``config.yaml`` once the micro-batch size is final.
        ctx: the parallel context (TP x DP grid).
        hooks: more hooks, after the model's own (a command's: distillation, the search;
            a test's faults).
        build: ``build(model_cfg, ctx, device)`` instead of ``build_model`` (the search's
            supernet; see :func:`~megatron_lite.run.build_run`).
    """

    def __init__(self, cfg: Config, ctx: ParallelContext, hooks: Sequence[TrainingHook] = (),
                 build: Callable | None = None):
        self.cfg, self.ctx = cfg, ctx
        t = cfg.train
        auto = t.micro_batch_size == 0
        if auto and cfg.parallel.pipeline_parallel_size > 1:
            raise ConfigError("train.micro_batch_size=auto is not pipelined: set it "
                              "(parallel.pipeline_parallel_size > 1)")
        if auto and cfg.parallel.engine == "deepspeed":
            raise ConfigError("train.micro_batch_size=auto is for parallel.engine=ddp "
                              "(DeepSpeed fixes its batch sizes when it starts)")
        if cfg.log.wandb:
            check_wandb()  # before anything is written
        if auto and cfg.parallel.distributed_optimizer:
            raise ConfigError("train.micro_batch_size=auto is not probed with "
                              "parallel.distributed_optimizer=true: give a micro-batch size")
        if auto:
            t.micro_batch_size = 1  # until probed, below
        # resolves cfg once (megatron_lite.resolve): paths, token batch, vocab, the checks
        self.run = build_run(cfg, ctx, training=True, make_model=pipelined_build(cfg, ctx, build))
        self._lock(t.run_dir)  # the config holds; before anything is written there
        try:
            self._build(hooks, auto)
        except BaseException:
            self.lock.release()  # a job that could not start holds no folder
            raise

    def _build(self, hooks: Sequence[TrainingHook], auto: bool) -> None:
        """The rest of :meth:`__init__`, the run folder held: hooks, engine, optimizer, the
        micro-batch probe, the resume, ``config.yaml``, the metrics."""
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        said = list(self.run.notes)
        self.model, self.accum = self.run.model, self.run.accum
        self.hooks = [*model_hooks(self.model, cfg), *hooks]
        if t.sample_interval:
            self.hooks.append(SampleHook(t.sample_interval))
        # Megatron's mixed precision: bf16 weights, fp32 main grads and masters (the
        # distributed optimizer keeps its own, sharded)
        self.mixed = MainParams(self.model) if t.params_dtype == "bf16" and \
            not cfg.parallel.distributed_optimizer else None
        if t.compile:
            compile_model(self.model, ctx)
        self.run_dir = Path(t.run_dir)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [g for h in self.hooks for g in h.param_groups(self)]
        self.optimizer = build_optimizer(self.model, cfg.optim, ctx.device, groups)
        unclipped = {id(p) for g in groups if not g.get("clip", True) for p in g["params"]}
        self.clipped = [p for p in self.params if id(p) not in unclipped]
        self.zero, self.engine = self._build_engine()
        self.distopt = self.engine if isinstance(self.engine, DistributedOptimizer) else None
        if self.distopt is not None:
            self.optimizer = self.distopt.base  # AdamW over this rank's slices
        # what holds sharded fp32 masters (clamps, checkpoints): DeepSpeed's or ours
        self.sharded = self.zero or self.distopt
        # parallel.pipeline_parallel_size > 1: the schedule runs each step's micro-batches
        self.pipeline = PipelineEngine(self.model, cfg, ctx, self.accum, self.distopt) \
            if ctx.pp_size > 1 else None
        self.scaler = DynamicLossScaler() if t.precision == "fp16" and not self.zero else None
        if auto:
            said.append(probe_micro_batch(self))
            self.accum = self.run.accum
        if ctx.is_main:
            for line in filter(None, said):
                print(line, flush=True)
        self.step, self.consumed, self.tokens_seen = 0, 0, 0
        # divergence guard: recent losses, recoveries so far, the learning rate's factor
        self.recent: collections.deque = collections.deque(maxlen=max(t.divergence_window, 1))
        self.recoveries, self.lr_scale = 0, 1.0
        for hook in self.hooks:
            hook.setup(self)
        self._resume()
        # a hook may replace both (at its before_step)
        self.train_data = self.run.train_data
        self.train_iter = self.run.batches(self.train_data, self.consumed)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            pattern = cfg.model.pattern
            if pattern != "sf" * cfg.model.num_layers:
                print(f"sublayer pattern ({pattern.count('s')} attention, {pattern.count('f')} "
                      f"feed-forward, bottom to top): {pattern}", flush=True)
            # every variant in one start line: the model's parts, then the hooks
            for line in [*describe_parts(cfg.model), *(h.describe(self) for h in self.hooks)]:
                if line:
                    print(f"variant: {line}", flush=True)
        wandb = {"project": cfg.log.wandb_project, "config": cfg.to_dict()} \
            if cfg.log.wandb else None
        self.metrics = MetricsLogger(self.run_dir, ctx.is_main, cfg.log.tensorboard, self.step,
                                     wandb=wandb)
        self.interrupted: str | None = None  # the signal that stopped fit(), if any
        self.peak = peak_flops(ctx.device, cfg.train.precision)

    def _lock(self, run_dir: str) -> None:
        """One job per run folder: the main rank takes ``RUN_DIR/.lock`` (released at the
        end of :meth:`fit`, or at exit); every rank raises the one error if it is held."""
        self.lock = FolderLock(os.path.abspath(os.path.expanduser(run_dir)), "train.run_dir")
        error = None
        if self.ctx.is_main:
            try:
                self.lock.acquire(warn=lambda line: print(line, flush=True))
                atexit.register(self.lock.release)
            except FolderInUse as err:
                error = str(err)
        if (error := error_sync(self.ctx)(error)) is not None:
            raise FolderInUse(error)

    def _build_engine(self):
        """``(zero, engine)``. The engine runs forward and backward: DDP over the DP group,
        the bare model (one DP rank), the distributed optimizer
        (:mod:`.distopt`, which reduce-scatters the gradients and steps this rank's slices),
        or DeepSpeed ZeRO (then also ``zero``), which owns the gradient reduction,
        clipping, master weights and loss scaling."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.parallel.engine == "deepspeed":
            zero = ZeroEngine(self.model, self.optimizer, cfg, ctx)
            return zero, zero
        if cfg.parallel.distributed_optimizer:
            return None, DistributedOptimizer(self.model, self.optimizer, cfg, ctx)
        if ctx.dp_size > 1 and self.mixed is None and ctx.pp_size == 1:
            # (MainParams reduces its fp32 grads; a pipeline after its schedule)
            return None, DistributedDataParallel(
                self.model, process_group=ctx.dp_group, bucket_cap_mb=cfg.parallel.ddp_bucket_mb,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        return None, self.model

    def _resume(self) -> None:
        """Load the resume source's weights, optimizer, RNG, counters and loss scaler; or,
        with ``train.finetune``, only the weights of ``train.load``."""
        t = self.cfg.train
        self.schedule = schedule_of(self.cfg)  # the LR schedule this run follows
        source, own = self._resume_source()
        if source is None:
            return
        saved = read_meta(resolve_checkpoint(source))
        if t.finetune and not own:  # Megatron's --finetune: a new run from these weights
            if self.distopt is not None:  # bf16 weights: their fp32 masters from the file
                self._load_masters_only(source)
            else:
                with self._fp32():
                    load_checkpoint(source, self.model, self.ctx)
            if self.ctx.is_main:
                print(f"fine-tuning from {source} (its step {saved['step']}): weights only; "
                      "fresh optimizer, step 0, this config's schedule", flush=True)
            return
        if saved["step"] >= t.max_steps:
            where = f"{self.run_dir} is" if own else f"train.load={source} is a checkpoint"
            hint = ("raise train.max_steps to train on" if own else
                    "raise train.max_steps to continue it, or train.finetune=true to start a "
                    "new run from its weights")
            raise ConfigError(f"{where} at step {saved['step']}, not before train.max_steps="
                              f"{t.max_steps}: nothing to train ({hint})")
        meta = self._load_resumable(source, own)
        for hook in self.hooks:
            hook.load_meta_state(meta)
            hook.load_state_dict(meta.get("rank_state", {}), self.ctx.device)
        self.step, self.consumed = meta["step"], meta["consumed_samples"]
        self.tokens_seen = meta.get("tokens_seen", 0)
        self.lr_scale = meta.get("lr_scale", 1.0)
        if self.scaler is not None and "loss_scaler" in meta:
            self.scaler.load_state_dict(meta["loss_scaler"])
        if self.zero is not None and "deepspeed_loss_scaler" in meta:
            self.zero.load_loss_scaler_state(meta["deepspeed_loss_scaler"])
        if self.ctx.is_main:
            print(f"resumed from {source} at step {self.step}", flush=True)
            if meta.get("data_path", self.cfg.data.data_path) != self.cfg.data.data_path:
                print(f"warning: data.data_path changed since the checkpoint (was "
                      f"{meta['data_path']!r}): reading on from sample {self.consumed} of "
                      "the new data", flush=True)
        self._check_schedule(meta.get("schedule"))

    def _load_resumable(self, source, own: bool) -> dict:
        """Load everything of ``source`` to continue from it. A restart whose latest
        checkpoint is unreadable goes back to the newest readable one of the run folder,
        with a warning naming both (every rank meets the same error: the reads are
        collective); ``train.load`` of another run has no such fallback."""
        latest = resolve_checkpoint(source)
        candidates = [latest] + ([c for c in reversed(list_checkpoints(self.run_dir))
                                  if c != latest] if own else [])
        first_error = None
        for ckpt in candidates:
            try:
                with self._fp32():
                    meta = load_checkpoint(ckpt, self.model, self.ctx, restore_rng=True,
                                           **self._optimizer_or_zero())
            except CheckpointError as err:
                first_error = first_error or err
                continue
            if first_error is not None and self.ctx.is_main:
                print(f"warning: the latest checkpoint {latest.name} is unreadable "
                      f"({first_error}); resuming from {ckpt.name}, the newest readable one",
                      flush=True)
            return meta
        raise first_error

    def _load_masters_only(self, source) -> None:
        """The distributed optimizer's fp32 masters from ``source``, and a fresh AdamW (its
        moments and settings as before the load): what fine-tuning starts from."""
        base = self.distopt.base
        settings = [dict(g) for g in base.param_groups]
        load_checkpoint(source, self.model, self.ctx, zero=self.distopt)
        base.state.clear()
        for group, before in zip(base.param_groups, settings, strict=True):
            group.update({k: v for k, v in before.items() if k != "params"})

    def _check_schedule(self, saved: dict | None) -> None:
        """A resume whose config changes the LR schedule (say ``train.max_steps``) keeps the
        checkpoint's, unless ``optim.override_schedule``; one warning line either way."""
        if not saved or saved == self.schedule:
            return
        changes = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self.schedule.items()
                            if saved.get(k) != v)
        before = scheduled_lr(saved, self.cfg.optim, self.step)
        if self.cfg.optim.override_schedule:
            after = scheduled_lr(self.schedule, self.cfg.optim, self.step)
            msg = (f"the LR schedule changed ({changes}); optim.override_schedule=true: "
                   f"following the new one (lr at step {self.step}: {before:.3g} -> "
                   f"{after:.3g})")
        else:
            self.schedule = saved
            msg = (f"this config's LR schedule differs from the checkpoint's ({changes}): "
                   f"keeping the checkpoint's (lr {before:.3g} at step {self.step}); "
                   "optim.override_schedule=true follows the new one")
        if self.ctx.is_main:
            print(f"warning: {msg}", flush=True)

    def _fp32(self, grads: bool = False):
        """``train.params_dtype=bf16``: the fp32 masters (and main grads) in the parameters,
        for what reads or writes the true weights (:meth:`MainParams.fp32`)."""
        return self.mixed.fp32(grads) if self.mixed is not None else contextlib.nullcontext()

    def _optimizer_or_zero(self) -> dict:
        """What holds the optimizer state, as the checkpoint functions take it."""
        return {"zero": self.sharded} if self.sharded is not None else \
            {"optimizer": self.optimizer}

    def _resume_source(self) -> tuple[str | Path | None, bool]:
        """``(source, own)``: ``run_dir``'s own latest checkpoint (a restart, ``own``),
        else ``train.load``, else None."""
        t = self.cfg.train
        if (self.run_dir / "checkpoints" / "latest").is_file():
            saved = load_config(self.run_dir / "config.yaml") \
                if (self.run_dir / "config.yaml").exists() else None
            if saved is not None:
                changed = [k for k, v in dataclasses.asdict(self.cfg.model).items()
                           if getattr(saved.model, k) != v and k != "activation_checkpointing"]
                if changed:
                    raise ConfigError(
                        f"{self.run_dir} holds a checkpoint of a different model "
                        f"({', '.join(f'model.{k}' for k in changed)} changed): use a new "
                        "train.run_dir, or train.load to start from it")
            return self.run_dir, True
        return t.load, False

    # ----------------------------------------------------------------------- steps

    def _autocast(self):
        """Autocast for the DDP engine; DeepSpeed's bf16 and ``train.params_dtype=bf16``
        keep the weights in bf16 instead."""
        if self.zero is not None or self.cfg.train.params_dtype == "bf16":
            return contextlib.nullcontext()
        return autocast(self.cfg.train.precision, self.ctx.device)

    def _advance(self, out: dict) -> dict:
        t = self.cfg.train
        self.step += 1
        self.consumed += t.global_batch_size
        self.tokens_seen += t.global_batch_size * self.train_data.seq_length
        return {"step": self.step, **out}

    def _forward(self, batch: dict) -> torch.Tensor:
        """The training loss of one micro-batch: the first hook's that owns it
        (:meth:`TrainingHook.loss`), else the engine's forward."""
        for hook in self.hooks:
            if (loss := hook.loss(self, batch)) is not None:
                return loss
        return self.engine(**batch)

    def _extra_loss(self) -> torch.Tensor | float:
        """The hooks' terms added to each micro-batch's loss for backward (0 without)."""
        extra = 0.0
        for hook in self.hooks:
            extra = extra + hook.extra_loss(self)
        return extra

    def _micro_batch(self, k: int) -> dict:
        """Micro-batch ``k`` of this step on the device, as the hooks make it."""
        batch = self.run.to_device(next(self.train_iter))
        for hook in self.hooks:
            batch = hook.micro_batch(self, batch, k)
        return batch

    def _after_micro_batch(self) -> None:
        for hook in self.hooks:
            hook.after_micro_batch(self)

    def _set_lr(self, groups, lr: float) -> None:
        """The scheduled learning rate, in every group that follows the schedule."""
        for group in groups:
            if group.get("lr_schedule", True):
                group["lr"] = lr

    def _finish_step(self, out: dict) -> dict:
        """Count the step, then add the hooks' :meth:`TrainingHook.step_metrics`."""
        out = self._advance(out)
        for hook in self.hooks:
            out.update(hook.step_metrics(self))
        return out

    def _zero_step(self, lr: float) -> dict:
        """One optimizer step through DeepSpeed (it accumulates, reduces, clips, steps)."""
        self._set_lr(self.zero.param_groups, lr)
        total = torch.zeros((), device=self.ctx.device)
        scale = self.zero.loss_scale()
        for k in range(self.accum):
            loss = self._forward(self._micro_batch(k))
            self.zero.backward(loss + self._extra_loss())
            grad_norm, stepped = self.zero.step()
            total += loss.detach().float()
            self._after_micro_batch()
        for hook in self.hooks:
            hook.after_optimizer_step(self)
        out = {"loss": self.run.dp_mean(total / self.accum), "lr": lr, "grad_norm": grad_norm}
        if scale is not None:
            out.update(loss_scale=scale, skipped=not stepped)
        return self._finish_step(out)

    def train_step(self) -> dict:
        """One optimizer step over ``accum`` micro-batches; returns its metrics."""
        cfg = self.cfg
        for hook in self.hooks:
            hook.before_step(self)
        self.engine.train()
        lr = scheduled_lr(self.schedule, cfg.optim, self.step) * self.lr_scale
        if self.zero is not None:
            return self._zero_step(lr)
        self._set_lr(self.optimizer.param_groups, lr)
        total = torch.zeros((), device=self.ctx.device)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        if self.pipeline is not None:  # every micro-batch through the stages at once
            with self._autocast():
                total = self.pipeline.step([self._micro_batch(k) for k in range(self.accum)])
            for _ in range(self.accum):
                self._after_micro_batch()
        for k in range(self.accum if self.pipeline is None else 0):
            batch = self._micro_batch(k)
            last = k == self.accum - 1
            sync = contextlib.nullcontext() if last or self.engine is self.model else \
                self.engine.no_sync()
            with sync:
                with self._autocast():
                    loss = self._forward(batch)
                ((loss + self._extra_loss()) * (scale / self.accum)).backward()
            total += loss.detach().float()
            self._after_micro_batch()
        self._finalize_grads()
        finite = True
        do = self.distopt
        with self._fp32(grads=True):
            for hook in self.hooks:
                hook.before_optimizer_step(self)
            if do is not None:
                do.skip_cleared()
            if self.scaler is not None:
                finite = self.scaler.unscale_and_check(
                    self.params if do is None else do.shard_params(), self.ctx.device)
            if not finite:
                grad_norm = math.nan
            elif do is not None:  # from this rank's slices: one all-reduce
                grad_norm = do.clip_grads_(cfg.optim.clip_grad)
            else:
                grad_norm = clip_grads_(self.clipped, cfg.optim.clip_grad, self.ctx)
            if finite:
                if do is not None:  # this rank's slices, then all-gathered into the weights
                    do.step()
                else:
                    self.optimizer.step()
                for hook in self.hooks:
                    hook.after_optimizer_step(self)
            if self.scaler is not None:
                self.scaler.update(finite)
            if do is not None:
                do.zero_grad()
            else:
                self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": self.run.dp_mean(total / self.accum), "lr": lr, "grad_norm": grad_norm}
        if self.scaler is not None:
            out.update(loss_scale=scale, skipped=not finite)
        return self._finish_step(out)

    def _finalize_grads(self) -> None:
        """After the step's last backward, before any hook or the optimizer sees the
        gradients: the one place where they are completed. The DP reduction the engine
        did not do during backward (``train.params_dtype=bf16`` without the distributed
        optimizer: MainParams' fp32 all-reduce; the distributed optimizer: the end of its
        reduce-scatters). (Sequence-parallel parameters' gradients are already summed
        over TP as backward produces them: ``parallel.layers.mark_sequence_parallel``.)"""
        cfg = self.cfg
        if self.distopt is not None:  # its slices
            self.distopt.finish_grad_sync()
            return
        if self.mixed is not None:  # fp32 main grads: averaged over DP here (no DDP)
            self.mixed.reduce_grads(self.ctx.dp_group, self.ctx.dp_size,
                                    int(cfg.parallel.ddp_bucket_mb * 2**20))

    def evaluate(self) -> dict:
        """Validation metrics over ``eval_iters`` global batches (the same every time), as
        ``val_*`` record keys (:func:`.evaluation.validation_metrics`). Empty
        without a validation split."""
        if self.run.valid_data is None:
            return {}
        result = evaluate(self.run, "valid", self.cfg.train.eval_iters,
                          precision=self._autocast)
        return validation_metrics(result)

    def save(self) -> Path:
        extra = {"consumed_samples": self.consumed,
                 "tokens_seen": self.tokens_seen, "schedule": self.schedule,
                 "lr_scale": self.lr_scale, "data_path": self.cfg.data.data_path}
        for hook in self.hooks:
            extra.update(hook.meta_state())
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        if self.zero is not None and self.zero.loss_scaler_state() is not None:
            extra["deepspeed_loss_scaler"] = self.zero.loss_scaler_state()
        rank_state = {}
        for hook in self.hooks:
            rank_state.update(hook.state_dict())
        with self._fp32():
            return save_checkpoint(self.run_dir, self.step, self.model, self.ctx, self.cfg,
                                   extra, keep=self.cfg.train.keep_checkpoints,
                                   rank_state=rank_state or None,
                                   async_save=self.cfg.train.async_save,
                                   **self._optimizer_or_zero())

    def _diverged(self, loss: float, grad_norm: float | None = None) -> str | None:
        """Why this step is a divergence (a NaN/inf loss, a NaN/inf gradient norm of a step
        that was applied, or a loss above ``divergence_factor`` x the baseline: the mean of
        the last ``divergence_window`` steps' losses, as many as there are, or before the
        first, ``log(vocab_size)``, the loss of a uniform guess), or None (then its loss
        joins the window). Diverged losses never join it, and a recovery keeps it, so the
        baseline stays the one from before the divergence."""
        t = self.cfg.train
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"  # the update wrote non-finite weights
        if self.recent:
            baseline = sum(self.recent) / len(self.recent)
            what = f"the mean of the last {len(self.recent)} steps"
        else:
            baseline = math.log(self.cfg.model.vocab_size)
            what = "log(vocab_size), a uniform guess's loss"
        if loss > t.divergence_factor * baseline:
            return f"loss {loss:.4g} > {t.divergence_factor:g} x {what} ({baseline:.4g})"
        self.recent.append(loss)
        return None

    def _recover(self, reason: str) -> None:
        """Back to the last checkpoint with a lower learning rate, past the offending
        batches (the data stream goes on where it is); logged in metrics.jsonl. The hooks
        get the checkpoint's run-wide state back, then :meth:`TrainingHook.on_recover`."""
        t = self.cfg.train
        bad = self.step
        self.recoveries += 1
        if self.recoveries > t.divergence_retries:
            raise TrainingDiverged(f"step {bad}: {reason}; gave up after {t.divergence_retries} "
                                   "recoveries (train.divergence_retries)")
        if not (self.run_dir / "checkpoints" / "latest").is_file():
            raise TrainingDiverged(f"step {bad}: {reason}; no checkpoint to go back to (set "
                                   "train.save_interval)")
        with self._fp32():
            meta = load_checkpoint(self.run_dir, self.model, self.ctx,
                                   **self._optimizer_or_zero())
        skipped = self.consumed - meta["consumed_samples"]
        self.step, self.tokens_seen = meta["step"], meta.get("tokens_seen", 0)
        self.lr_scale *= t.divergence_lr_scale  # self.recent: the baseline from before
        for hook in self.hooks:
            hook.load_meta_state(meta)
            hook.on_recover(self)
        self.metrics.rewind(self.step)
        self.metrics.log({"step": self.step, "event": "divergence", "reason": reason,
                          "at_step": bad, "skipped_samples": skipped, "lr_scale": self.lr_scale})
        if self.ctx.is_main:
            print(f"divergence at step {bad} ({reason}): back to step {self.step}, "
                  f"{skipped} samples skipped, learning rate x{self.lr_scale:g} "
                  f"(recovery {self.recoveries} of {t.divergence_retries})", flush=True)

    def fit(self) -> list[dict]:
        """Train to ``train.max_steps``; returns the logged records (on every rank).

        SIGINT, SIGTERM or SIGUSR1 on any rank stops every rank after the same step, with a
        checkpoint (``self.interrupted`` names the signal; see :mod:`.interrupt`). A hook's
        :meth:`TrainingHook.should_stop` ends it early; :meth:`TrainingHook.at_end` follows
        the last checkpoint.
        """
        with Interrupt(verbose=self.ctx.is_main) as interrupt:
            records = self._loop(interrupt)
        self.save()
        wait_for_checkpoint()  # an async save (this last one too) is published before exit
        self.metrics.close()
        for hook in self.hooks:
            hook.at_end(self)
        self.lock.release()
        return records

    def _loop(self, interrupt: Interrupt) -> list[dict]:
        t = self.cfg.train
        records = []
        busy, steps_since = 0.0, 0  # seconds spent in train steps since the last log line
        steps_here = 0
        while self.step < t.max_steps and not any([h.should_stop(self) for h in self.hooks]):
            tick = time.perf_counter()
            out = self.train_step()
            busy += time.perf_counter() - tick
            norm = None if out.get("skipped") else out.get("grad_norm")  # fp16 skips: fine
            if t.divergence_guard and (reason := self._diverged(out["loss"], norm)):
                self._recover(reason)
                busy, steps_since = 0.0, 0
                continue
            steps_since += 1
            at_end = self.step == t.max_steps
            if t.eval_interval > 0 and (self.step % t.eval_interval == 0 or at_end):
                out.update(self.evaluate())
            if self.step % max(t.log_interval, 1) == 0 or at_end or "val_loss" in out:
                seconds = busy / steps_since
                seq = self.train_data.seq_length  # a hook may change it
                flops = model_flops_per_step(self.cfg.model, t.global_batch_size, seq)
                out["tokens_per_sec"] = t.global_batch_size * seq / seconds
                out["tflops"] = flops / seconds / 1e12
                if self.peak:
                    out["mfu"] = flops / seconds / (self.peak * self.ctx.world_size)
                for hook in self.hooks:
                    out.update(hook.log_metrics(self))
                out["samples_per_source"] = self.run.samples_per_source(self.train_data,
                                                                        self.consumed)
                self.metrics.log(out)
                records.append(out)
                busy, steps_since = 0.0, 0
            steps_here += 1
            if at_end:
                break
            if (signum := interrupt.agreed(self.ctx.device)) is not None:
                self.interrupted = signal.Signals(signum).name
                break
            if t.exit_after and steps_here >= t.exit_after:
                break
            if t.save_interval > 0 and self.step % t.save_interval == 0:
                self.save()
        return records
