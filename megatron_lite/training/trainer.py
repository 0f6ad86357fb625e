"""The training loop: build -> (load) -> train with accumulation, clipping, eval, logging, save."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.config import Config, ConfigError, load_config, save_config
from megatron_lite.data.gpt_dataset import GPTDataset, check_vocab, split_ranges
from megatron_lite.data.indexed import IndexedDataError, IndexedDataset
from megatron_lite.data.loader import dict_collate, gpt_collate, micro_batches
from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext
from megatron_lite.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_lite.training.metrics import MetricsLogger, model_flops_per_step, peak_flops
from megatron_lite.training.optim import build_optimizer, clip_grads_
from megatron_lite.training.precision import DynamicLossScaler, autocast
from megatron_lite.training.schedule import learning_rate


def tokenizer_from_config(cfg: Config) -> Tokenizer | None:
    """The tokenizer named in ``data.*``, or None when the config names none."""
    d = cfg.data
    if not d.tokenizer_type or not (d.vocab_file or d.tokenizer_model):
        return None
    return build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model)


def error_sync(ctx: ParallelContext):
    """Exchange each rank's error message (or None); returns the first. Doubles as a barrier."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return lambda error: error

    def sync(error: str | None) -> str | None:
        errors = [None] * ctx.world_size
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    return sync


class Trainer:
    """One run. ``Trainer(cfg, ctx).fit()`` trains ``train.max_steps`` optimizer steps.

    Args:
        cfg: the resolved config (``model.vocab_size`` is taken from the tokenizer when
            ``data`` names tokenizer files).
        ctx: the parallel context (TP x DP grid).
        training: False builds model and data only (no optimizer, nothing written).
    """

    def __init__(self, cfg: Config, ctx: ParallelContext, training: bool = True):
        self.cfg, self.ctx = cfg, ctx
        t = cfg.train
        self.tokenizer = tokenizer_from_config(cfg)
        if self.tokenizer is not None:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        cfg.validate(ctx.world_size)
        if cfg.parallel.tensor_parallel_size != ctx.tp_size:
            raise ConfigError(f"parallel.tensor_parallel_size={cfg.parallel.tensor_parallel_size}"
                              f" but the job was started with TP={ctx.tp_size}")
        self.accum = t.global_batch_size // (t.micro_batch_size * ctx.dp_size)
        self.run_dir = Path(t.run_dir)

        ctx.seed(t.seed)
        self.model = build_model(cfg.model, ctx, device=ctx.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim, ctx.device) if training else None
        # the engine: DDP over the DP group (or the bare model), or DeepSpeed ZeRO, which
        # then owns the gradient reduction, clipping, master weights and loss scaling
        self.zero = None
        self.ddp = self.model
        if training and cfg.parallel.engine == "deepspeed":
            from megatron_lite.training.zero import ZeroEngine

            self.zero = self.ddp = ZeroEngine(self.model, self.optimizer, cfg, ctx)
        elif ctx.dp_size > 1:
            self.ddp = DistributedDataParallel(
                self.model, process_group=ctx.dp_group,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.scaler = DynamicLossScaler() if t.precision == "fp16" and not self.zero else None
        self.step, self.consumed, self.tokens_seen = 0, 0, 0
        source = self._resume_source() if training else None
        if source is not None:
            meta = load_checkpoint(source, self.model, self.zero or self.optimizer, ctx,
                                   restore_rng=True)
            self.step, self.consumed = meta["step"], meta["consumed_samples"]
            self.tokens_seen = meta.get("tokens_seen", 0)
            if self.scaler is not None and "loss_scaler" in meta:
                self.scaler.load_state_dict(meta["loss_scaler"])
            if self.zero is not None and "deepspeed_loss_scaler" in meta:
                self.zero.load_loss_scaler_state(meta["deepspeed_loss_scaler"])
            if ctx.is_main:
                print(f"resumed from {source} at step {self.step}", flush=True)
        self.phase2_step = (int(t.phase2_start * t.max_steps)
                            if t.phase2_seq_length and cfg.model.arch == "bert" else None)
        self.train_data, self.valid_data = self._datasets()
        self._start_phase()
        if ctx.is_main and training:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(self.run_dir, ctx.is_main and training, cfg.log.tensorboard)
        self.peak = peak_flops(ctx.device)

    def _resume_source(self):
        """``run_dir``'s own latest checkpoint (a restart), else ``train.load``, else None."""
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
            return self.run_dir
        return t.load

    # ----------------------------------------------------------------------- data

    def _datasets(self, seq_length: int | None = None):
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        seq = seq_length or cfg.model.seq_length
        if not cfg.data.data_path:
            raise ConfigError("data.data_path is not set (a shard prefix, without .bin/.idx)")
        indexed = IndexedDataset(cfg.data.data_path)
        sync = error_sync(ctx)
        error = None
        if ctx.is_main and seq_length is None:
            try:
                check_vocab(indexed, cfg.model.vocab_size)
            except IndexedDataError as err:
                error = str(err)
        if (error := sync(error)) is not None:
            raise IndexedDataError(error)
        ranges = split_ranges(indexed.num_documents, cfg.data.split)
        # an eval "iteration" is one global batch, so validation reads the same samples at
        # every DP size
        sizes = (t.max_steps * t.global_batch_size, t.eval_iters * t.global_batch_size)
        if cfg.model.arch == "bert":
            from megatron_lite.data.bert_dataset import BertDataset

            tokens, continuation = self._bert_tokens()
            make = lambda rng, n, name: BertDataset(  # noqa: E731
                indexed, rng, seq, n, t.seed, tokens, cfg.data, name=name,
                continuation=continuation, build=ctx.is_main, sync=sync)
        else:
            make = lambda rng, n, name: GPTDataset(  # noqa: E731
                indexed, rng, seq, n, t.seed, name=name, build=ctx.is_main, sync=sync)
        train = make(ranges[0], sizes[0], "train")
        valid = None
        if t.eval_iters > 0 and t.eval_interval > 0 and seq_length is None:
            try:  # too small or empty: every rank gets the same error, and goes on without
                valid = make(ranges[1], sizes[1], "valid")
            except IndexedDataError as err:
                if ctx.is_main:
                    print(f"warning: no validation ({err})", flush=True)
        return train, valid

    def _bert_tokens(self):
        if self.tokenizer is None or "[MASK]" not in self.tokenizer.specials:
            raise ConfigError("BERT training needs a WordPiece data.tokenizer_type and "
                              "data.vocab_file (for the [CLS] [SEP] [MASK] [PAD] ids)")
        tok = self.tokenizer
        continuation = None
        if self.cfg.data.whole_word_masking:
            continuation = np.zeros(tok.vocab_size, dtype=bool)
            for piece, i in tok._backend.get_vocab().items():
                continuation[i] = piece.startswith("##")
        return dict(tok.specials, vocab_size=tok.vocab_size), continuation

    def _start_phase(self) -> None:
        """(Re)start the training iterator; BERT switches to phase 2 at ``phase2_step``."""
        t = self.cfg.train
        if self.phase2_step is not None and self.step >= self.phase2_step:
            if self.ctx.is_main:
                print(f"BERT phase 2 from step {self.phase2_step}: seq_length "
                      f"{t.phase2_seq_length}", flush=True)
            phase2_data, _ = self._datasets(t.phase2_seq_length)
            self.train_data = phase2_data
            offset = self.consumed - self.phase2_step * t.global_batch_size
            self.train_iter = self._iterator(phase2_data, offset)
        else:
            self.train_iter = self._iterator(self.train_data, self.consumed)

    def _iterator(self, dataset, consumed: int):
        collate = dict_collate if self.cfg.model.arch == "bert" else gpt_collate
        return micro_batches(dataset, consumed, self.cfg.train.micro_batch_size,
                             self.ctx.dp_rank, self.ctx.dp_size, collate)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    # ----------------------------------------------------------------------- steps

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.ctx.dp_group is not None:
            value = value.clone()
            dist.all_reduce(value, group=self.ctx.dp_group)
            value /= self.ctx.dp_size
        return value.item()

    def _autocast(self):
        """Autocast for the DDP engine; DeepSpeed's bf16 keeps the weights in bf16 instead."""
        if self.zero is not None:
            return contextlib.nullcontext()
        return autocast(self.cfg.train.precision, self.ctx.device)

    def _advance(self, out: dict) -> dict:
        t = self.cfg.train
        self.step += 1
        self.consumed += t.global_batch_size
        self.tokens_seen += t.global_batch_size * self.train_data.seq_length
        return {"step": self.step, **out}

    def _zero_step(self, lr: float) -> dict:
        """One optimizer step through DeepSpeed (it accumulates, reduces, clips, steps)."""
        for group in self.zero.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.ctx.device)
        scale = self.zero.loss_scale()
        for _ in range(self.accum):
            loss = self.zero(**self._to_device(next(self.train_iter)))
            self.zero.backward(loss)
            grad_norm, stepped = self.zero.step()
            total += loss.detach().float()
        out = {"loss": self._dp_mean(total / self.accum), "lr": lr, "grad_norm": grad_norm}
        if scale is not None:
            out.update(loss_scale=scale, skipped=not stepped)
        return self._advance(out)

    def train_step(self) -> dict:
        """One optimizer step over ``accum`` micro-batches; returns its metrics."""
        cfg, t = self.cfg, self.cfg.train
        self.ddp.train()
        lr = learning_rate(self.step, cfg.optim, t.max_steps)
        if self.zero is not None:
            return self._zero_step(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.ctx.device)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        for k in range(self.accum):
            batch = self._to_device(next(self.train_iter))
            last = k == self.accum - 1
            sync = contextlib.nullcontext() if last or self.ddp is self.model else \
                self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss = self.ddp(**batch)
                (loss * (scale / self.accum)).backward()
            total += loss.detach().float()
        finite = True
        if self.scaler is not None:
            finite = self.scaler.unscale_and_check(self.params, self.ctx.device)
        grad_norm = clip_grads_(self.params, cfg.optim.clip_grad, self.ctx) if finite else math.nan
        if finite:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": self._dp_mean(total / self.accum), "lr": lr, "grad_norm": grad_norm}
        if self.scaler is not None:
            out.update(loss_scale=scale, skipped=not finite)
        return self._advance(out)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over ``eval_iters`` global batches (the same every time)."""
        if self.valid_data is None:
            return None
        self.ddp.eval()
        it = self._iterator(self.valid_data, 0)
        n = self.cfg.train.eval_iters * self.accum
        total = torch.zeros((), device=self.ctx.device)
        for batch in itertools.islice(it, n):
            with self._autocast():
                total += self.model(**self._to_device(batch)).float()
        return self._dp_mean(total / n)

    def save(self) -> Path:
        extra = {"consumed_samples": self.consumed,
                 "tokens_seen": self.tokens_seen}
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        if self.zero is not None and self.zero.loss_scaler_state() is not None:
            extra["deepspeed_loss_scaler"] = self.zero.loss_scaler_state()
        return save_checkpoint(self.run_dir, self.step, self.model, self.zero or self.optimizer,
                               self.ctx, self.cfg, extra, keep=self.cfg.train.keep_checkpoints)

    def _maybe_fail(self) -> None:
        t = self.cfg.train
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if t.fail_at_step and self.step == t.fail_at_step and first_attempt \
                and self.ctx.rank == t.fail_rank:
            print(f"fault injection: killing rank {self.ctx.rank} after step {self.step}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def fit(self) -> list[dict]:
        """Train to ``train.max_steps``; returns the logged records (on every rank)."""
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
            steps_since += 1
            at_end = self.step == t.max_steps
            if t.eval_interval > 0 and (self.step % t.eval_interval == 0 or at_end):
                val = self.evaluate()
                if val is not None:
                    out.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
            if self.step % max(t.log_interval, 1) == 0 or at_end or "val_loss" in out:
                seconds = busy / steps_since
                seq = self.train_data.seq_length  # phase 2 of BERT changes it
                flops = model_flops_per_step(self.cfg.model, t.global_batch_size, seq)
                out["tokens_per_sec"] = t.global_batch_size * seq / seconds
                out["tflops"] = flops / seconds / 1e12
                if self.peak:
                    out["mfu"] = flops / seconds / (self.peak * self.ctx.world_size)
                self.metrics.log(out)
                records.append(out)
                busy, steps_since = 0.0, 0
            steps_here += 1
            if t.exit_after and steps_here >= t.exit_after and not at_end:
                break
            if t.save_interval > 0 and self.step % t.save_interval == 0 and not at_end:
                self.save()
            self._maybe_fail()
        self.save()
        self.plot = self.metrics.close()
        return records
