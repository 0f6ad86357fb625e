"""The training loop: build -> (load) -> train with accumulation, clipping, eval, logging, save."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.checkpoint import (
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    wait_for_checkpoint,
)
from megatron_lite.config import Config, ConfigError, load_config, resolve_paths, save_config
from megatron_lite.models import set_layerdrop_key
from megatron_lite.models.adaptive_span import span_modules
from megatron_lite.models.bert import bert_metrics
from megatron_lite.models.relative import Memory
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.resolve import resolve_global_batch
from megatron_lite.run import build_run
from megatron_lite.training.compile import compile_model
from megatron_lite.training.evaluation import evaluate
from megatron_lite.training.interrupt import Interrupt
from megatron_lite.training.metrics import (
    MetricsLogger,
    model_flops_per_step,
    peak_flops,
    plot_spans,
)
from megatron_lite.training.mixed import MainParams
from megatron_lite.training.optim import build_optimizer, clip_grads_
from megatron_lite.training.precision import DynamicLossScaler, autocast
from megatron_lite.training.probe import probe_micro_batch
from megatron_lite.training.schedule import schedule_of, scheduled_lr


class TrainingDiverged(ValueError):
    """The divergence guard gave up (one line: the step, why, how many recoveries)."""


class Trainer:
    """One run. ``Trainer(cfg, ctx).fit()`` trains ``train.max_steps`` optimizer steps.

    The model and data come from :func:`megatron_lite.run.build_run` (``self.run``); the
    Trainer owns the optimizer, the engine, checkpoints, metrics and the loop.

    Args:
        cfg: the resolved config (``model.vocab_size`` is taken from the tokenizer when
            ``data`` names tokenizer files).
        ctx: the parallel context (TP x DP grid).
    """

    def __init__(self, cfg: Config, ctx: ParallelContext):
        self.cfg, self.ctx = resolve_paths(cfg), ctx  # config.yaml works from anywhere
        t = cfg.train
        said = [resolve_global_batch(cfg, ctx.dp_size)]  # train.global_batch_tokens
        auto = t.micro_batch_size == 0
        if auto and cfg.parallel.engine == "deepspeed":
            raise ConfigError("train.micro_batch_size=auto is for parallel.engine=ddp "
                              "(DeepSpeed fixes its batch sizes when it starts)")
        if auto:
            t.micro_batch_size = 1  # until probed, below
        self.run = build_run(cfg, ctx, training=True)
        self.model, self.accum = self.run.model, self.run.accum
        # Megatron's mixed precision: bf16 weights, fp32 main grads and masters
        self.mixed = MainParams(self.model) if t.params_dtype == "bf16" else None
        if t.compile:
            compile_model(self.model, ctx)
        self.run_dir = Path(t.run_dir)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim, ctx.device)
        self.zero, self.engine = self._build_engine()
        self.scaler = DynamicLossScaler() if t.precision == "fp16" and not self.zero else None
        if auto:
            said.append(probe_micro_batch(self))
            self.accum = self.run.accum
        if ctx.is_main:
            for line in filter(None, said):
                print(line, flush=True)
        self.step, self.consumed, self.tokens_seen = 0, 0, 0
        self.spans = span_modules(self.model)  # adaptive attention span, bottom to top
        self.stats = None  # BERT: this step's summed BertModel.stats
        # divergence guard: recent losses, recoveries so far, the learning rate's factor
        self.recent: collections.deque = collections.deque(maxlen=max(t.divergence_window, 1))
        self.recoveries, self.lr_scale, self.injected = 0, 1.0, 0
        # Transformer-XL: one memory per micro-batch (its rows are the same lanes each step)
        self.memories = [Memory(cfg.model.mem_len) for _ in range(self.accum)] \
            if cfg.model.mem_len > 0 else None
        if self.memories is not None and cfg.data.ordering != "consecutive":
            what = "model.adaptive_span (its memory of model.attn_span positions)" \
                if cfg.model.adaptive_span else f"model.mem_len={cfg.model.mem_len}"
            raise ConfigError(f"{what} needs data.ordering=consecutive in training: with "
                              "shuffled samples the memory holds unrelated text, and the model "
                              "learns to ignore it")
        self._resume()
        self.phase2_step = (int(t.phase2_start * t.max_steps)
                            if t.phase2_seq_length and cfg.model.arch == "bert" else None)
        self.train_data = self.run.train_data
        self._start_phase()
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            pattern = cfg.model.pattern
            if pattern != "sf" * cfg.model.num_layers:
                print(f"sublayer pattern ({pattern.count('s')} attention, {pattern.count('f')} "
                      f"feed-forward, bottom to top): {pattern}", flush=True)
        self.metrics = MetricsLogger(self.run_dir, ctx.is_main, cfg.log.tensorboard, self.step)
        self.interrupted: str | None = None  # the signal that stopped fit(), if any
        self.peak = peak_flops(ctx.device, cfg.train.precision)

    def _build_engine(self):
        """``(zero, engine)``. The engine runs forward and backward: DDP over the DP group,
        the bare model (one DP rank), or DeepSpeed ZeRO (then also ``zero``), which owns
        the gradient reduction, clipping, master weights and loss scaling."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.parallel.engine == "deepspeed":
            from megatron_lite.training.zero import ZeroEngine

            zero = ZeroEngine(self.model, self.optimizer, cfg, ctx)
            return zero, zero
        if ctx.dp_size > 1 and self.mixed is None:  # MainParams reduces its fp32 grads
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
        with self._fp32():
            meta = load_checkpoint(source, self.model, self.ctx, restore_rng=True,
                                   **self._optimizer_or_zero())
        saved = meta.get("rank_state", {}).get("memory")
        if self.memories is not None and saved is not None and len(saved) == self.accum:
            for memory, state in zip(self.memories, saved, strict=True):
                memory.load_state_dict(state, self.ctx.device)
        self.step, self.consumed = meta["step"], meta["consumed_samples"]
        self.tokens_seen = meta.get("tokens_seen", 0)
        self.lr_scale = meta.get("lr_scale", 1.0)
        if self.scaler is not None and "loss_scaler" in meta:
            self.scaler.load_state_dict(meta["loss_scaler"])
        if self.zero is not None and "deepspeed_loss_scaler" in meta:
            self.zero.load_loss_scaler_state(meta["deepspeed_loss_scaler"])
        if self.ctx.is_main:
            print(f"resumed from {source} at step {self.step}", flush=True)
        self._check_schedule(meta.get("schedule"))

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
        return {"zero": self.zero} if self.zero is not None else {"optimizer": self.optimizer}

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

    def _start_phase(self) -> None:
        """(Re)start the training iterator; BERT switches to phase 2 at ``phase2_step``."""
        t = self.cfg.train
        if self.phase2_step is not None and self.step >= self.phase2_step:
            if self.ctx.is_main:
                print(f"BERT phase 2 from step {self.phase2_step}: seq_length "
                      f"{t.phase2_seq_length}", flush=True)
            self.train_data, _ = self.run.datasets(t.phase2_seq_length, validation=False)
            offset = self.consumed - self.phase2_step * t.global_batch_size
            self.train_iter = self.run.batches(self.train_data, offset)
        else:
            self.train_iter = self.run.batches(self.train_data, self.consumed)

    # ----------------------------------------------------------------------- steps

    def _autocast(self):
        """Autocast for the DDP engine; DeepSpeed's bf16 and ``train.params_dtype=bf16``
        keep the weights in bf16 instead."""
        if self.zero is not None or self.mixed is not None:
            return contextlib.nullcontext()
        return autocast(self.cfg.train.precision, self.ctx.device)

    def _advance(self, out: dict) -> dict:
        t = self.cfg.train
        self.step += 1
        self.consumed += t.global_batch_size
        self.tokens_seen += t.global_batch_size * self.train_data.seq_length
        return {"step": self.step, **out}

    def _span_penalty(self) -> torch.Tensor | float:
        """Adaptive span's ``lambda * sum z`` over this rank's heads (0 without it)."""
        if not self.spans:
            return 0.0
        return self.cfg.model.adaptive_span_loss * sum(s.penalty() for s in self.spans)

    def _span_log(self) -> dict:
        """``span_loss``: the penalty over every head (not part of ``loss``)."""
        if not self.spans:
            return {}
        with torch.no_grad():
            value = torch.as_tensor(self._span_penalty(), device=self.ctx.device).detach()
            return {"span_loss": all_reduce(value.clone(), self.ctx.tp_group).item()}

    def _span_stats(self) -> dict:
        """Per layer, the mean and largest span of its heads (collective over TP)."""
        if not self.spans:
            return {}
        spans = [s.all_spans() for s in self.spans]
        return {"span_mean": [round(float(z.mean()), 2) for z in spans],
                "span_max": [round(float(z.max()), 2) for z in spans]}

    def _forward(self, batch: dict) -> torch.Tensor:
        """The training loss of one micro-batch through the engine (the Distiller's is
        the relations' KL)."""
        return self.engine(**batch)

    def _add_stats(self) -> None:
        """BERT: add the micro-batch's loss parts and accuracy counts to this step's."""
        if self.cfg.model.arch == "bert":
            self.stats = self.model.last_stats + (self.stats if self.stats is not None else 0)

    def _step_log(self) -> dict:
        """More of this step's record: BERT's ``mlm_loss``, ``nsp_loss`` and accuracies over
        every DP rank (the Distiller adds its relations' KL)."""
        if self.stats is None:
            return {}
        stats = all_reduce(self.stats, self.ctx.dp_group).tolist()
        self.stats = None
        return bert_metrics(stats, self.accum * self.ctx.dp_size)

    def _micro_batch(self, k: int) -> dict:
        """Micro-batch ``k`` of this step on the device, with its memory (Transformer-XL);
        seeds LayerDrop's decisions for it (a function of the step: the same on a resume)."""
        set_layerdrop_key(self.model, (self.cfg.train.seed, self.step, k))
        batch = self.run.to_device(next(self.train_iter))
        if self.memories is not None:
            if k == 0 and self.train_data.position(self.consumed)[1] == 0:
                for m in self.memories:  # the lanes start over: nothing to remember
                    m.reset()
            batch["memory"] = self.memories[k]
        return batch

    def _zero_step(self, lr: float) -> dict:
        """One optimizer step through DeepSpeed (it accumulates, reduces, clips, steps)."""
        for group in self.zero.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.ctx.device)
        span_log = self._span_log()  # the penalty this step trains with
        scale = self.zero.loss_scale()
        for k in range(self.accum):
            loss = self._forward(self._micro_batch(k))
            self.zero.backward(loss + self._span_penalty())
            grad_norm, stepped = self.zero.step()
            total += loss.detach().float()
            self._add_stats()
        if self.spans:  # z_h in [0, S], masters included
            self.zero.clamp_([s.fraction for s in self.spans], 0.0, 1.0)
        out = {"loss": self.run.dp_mean(total / self.accum), **self._step_log(), "lr": lr,
               "grad_norm": grad_norm, **span_log}
        if scale is not None:
            out.update(loss_scale=scale, skipped=not stepped)
        return self._advance(out)

    def train_step(self) -> dict:
        """One optimizer step over ``accum`` micro-batches; returns its metrics."""
        cfg = self.cfg
        self.engine.train()
        lr = scheduled_lr(self.schedule, cfg.optim, self.step) * self.lr_scale
        if self.zero is not None:
            return self._zero_step(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.ctx.device)
        span_log = self._span_log()  # the penalty this step trains with
        scale = self.scaler.scale if self.scaler is not None else 1.0
        for k in range(self.accum):
            batch = self._micro_batch(k)
            last = k == self.accum - 1
            sync = contextlib.nullcontext() if last or self.engine is self.model else \
                self.engine.no_sync()
            with sync:
                with self._autocast():
                    loss = self._forward(batch)
                ((loss + self._span_penalty()) * (scale / self.accum)).backward()
            total += loss.detach().float()
            self._add_stats()
        if self.mixed is not None:  # fp32 main grads: averaged over DP here (no DDP)
            self.mixed.reduce_grads(self.ctx.dp_group, self.ctx.dp_size,
                                    int(cfg.parallel.ddp_bucket_mb * 2**20))
        finite = True
        with self._fp32(grads=True):
            if self.scaler is not None:
                finite = self.scaler.unscale_and_check(self.params, self.ctx.device)
            grad_norm = (clip_grads_(self.params, cfg.optim.clip_grad, self.ctx) if finite
                         else math.nan)
            if finite:
                self.optimizer.step()
                for span in self.spans:  # z_h in [0, S] (ZeroEngine.clamp_ under ZeRO)
                    span.clamp_()
            if self.scaler is not None:
                self.scaler.update(finite)
            self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": self.run.dp_mean(total / self.accum), **self._step_log(), "lr": lr,
               "grad_norm": grad_norm, **span_log}
        if self.scaler is not None:
            out.update(loss_scale=scale, skipped=not finite)
        return self._advance(out)

    def evaluate(self) -> dict:
        """Validation metrics over ``eval_iters`` global batches (the same every time), as
        ``val_*`` record keys: GPT ``val_loss`` and ``val_ppl``; BERT ``val_loss`` (MLM +
        NSP) and its parts and accuracies. Empty without a validation split."""
        if self.run.valid_data is None:
            return {}
        result = evaluate(self.run, "valid", self.cfg.train.eval_iters,
                          precision=self._autocast)
        keys = ("loss", "perplexity", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")
        out = {f"val_{k}": result[k] for k in keys if k in result}
        if "val_perplexity" in out:
            out["val_ppl"] = out.pop("val_perplexity")
        return out

    def save(self) -> Path:
        extra = {"consumed_samples": self.consumed,
                 "tokens_seen": self.tokens_seen, "schedule": self.schedule,
                 "lr_scale": self.lr_scale}
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        if self.zero is not None and self.zero.loss_scaler_state() is not None:
            extra["deepspeed_loss_scaler"] = self.zero.loss_scaler_state()
        rank_state = {"memory": [m.state_dict() for m in self.memories]} \
            if self.memories is not None else None
        with self._fp32():
            return save_checkpoint(self.run_dir, self.step, self.model, self.ctx, self.cfg,
                                   extra, keep=self.cfg.train.keep_checkpoints,
                                   rank_state=rank_state, async_save=self.cfg.train.async_save,
                                   **self._optimizer_or_zero())

    def _diverged(self, loss: float, grad_norm: float | None = None) -> str | None:
        """Why this step is a divergence (a NaN/inf loss, a NaN/inf gradient norm of a step
        that was applied, or a loss above ``divergence_factor`` x the mean of the last
        ``divergence_window`` steps), or None (then its loss joins them)."""
        t = self.cfg.train
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"  # the update wrote non-finite weights
        if len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > t.divergence_factor * mean:
                return (f"loss {loss:.4g} > {t.divergence_factor:g} x the mean of the last "
                        f"{len(self.recent)} steps ({mean:.4g})")
        self.recent.append(loss)
        return None

    def _recover(self, reason: str) -> None:
        """Back to the last checkpoint with a lower learning rate, past the offending
        batches (the data stream goes on where it is); logged in metrics.jsonl."""
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
        self.lr_scale *= t.divergence_lr_scale
        self.recent.clear()
        for memory in self.memories or []:
            memory.reset()
        self.metrics.rewind(self.step)
        self.metrics.log({"step": self.step, "event": "divergence", "reason": reason,
                          "at_step": bad, "skipped_samples": skipped, "lr_scale": self.lr_scale})
        if self.ctx.is_main:
            print(f"divergence at step {bad} ({reason}): back to step {self.step}, "
                  f"{skipped} samples skipped, learning rate x{self.lr_scale:g} "
                  f"(recovery {self.recoveries} of {t.divergence_retries})", flush=True)

    def _maybe_fail(self) -> None:
        t = self.cfg.train
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if t.fail_at_step and self.step == t.fail_at_step and first_attempt \
                and self.ctx.rank == t.fail_rank:
            print(f"fault injection: killing rank {self.ctx.rank} after step {self.step}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def fit(self) -> list[dict]:
        """Train to ``train.max_steps``; returns the logged records (on every rank).

        SIGINT, SIGTERM or SIGUSR1 on any rank stops every rank after the same step, with a
        checkpoint (``self.interrupted`` names the signal; see :mod:`.interrupt`).
        """
        with Interrupt(verbose=self.ctx.is_main) as interrupt:
            records = self._loop(interrupt)
        self.save()
        wait_for_checkpoint()  # an async save (this last one too) is published before exit
        self.metrics.close()
        if self.spans:
            spans = [s.all_spans().tolist() for s in self.spans]  # collective over TP
            if self.ctx.is_main:
                plot_spans(spans, self.cfg.model.attn_span, self.run_dir / "spans.png")
        return records

    def _loop(self, interrupt: Interrupt) -> list[dict]:
        t = self.cfg.train
        records = []
        busy, steps_since = 0.0, 0  # seconds spent in train steps since the last log line
        steps_here = 0
        while self.step < t.max_steps:
            tick = time.perf_counter()
            if self.phase2_step is not None and self.step == self.phase2_step:
                self._start_phase()
            out = self.train_step()
            busy += time.perf_counter() - tick
            if t.inject_nan_at_step == self.step and self.injected < t.inject_nan_times:
                self.injected += 1  # fault injection for the divergence guard's tests
                out["loss"] = math.nan
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
                seq = self.train_data.seq_length  # phase 2 of BERT changes it
                flops = model_flops_per_step(self.cfg.model, t.global_batch_size, seq)
                out["tokens_per_sec"] = t.global_batch_size * seq / seconds
                out["tflops"] = flops / seconds / 1e12
                if self.peak:
                    out["mfu"] = flops / seconds / (self.peak * self.ctx.world_size)
                out.update(self._span_stats())
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
            self._maybe_fail()
        return records
