"""One way to build a run: check the config, then tokenizer -> model -> data.

    run = build_run(cfg, ctx)                  # train: model, train + validation data
    run = build_run(cfg, ctx, training=False)  # evaluate: the validation split in any case
    run = build_run(cfg, ctx, data=False)      # generate, convert, ...: tokenizer + model

Every command builds through here (train, evaluate, generate, and the commands that
build models without training), so a model, its data and its batches are made the same
way everywhere. The :class:`~megatron_lite.training.trainer.Trainer` adds what only
training needs: the optimizer, the engine (DDP or DeepSpeed ZeRO), checkpoints and the
loop. Nothing here writes a file except the datasets' index caches.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.data.gpt_dataset import GPTDataset, check_vocab, split_ranges
from megatron_lite.data.indexed import IndexedDataError, IndexedDataset
from megatron_lite.data.loader import dict_collate, gpt_collate, micro_batches
from megatron_lite.data.stream import ConsecutiveGPTDataset, TokenStream
from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer
from megatron_lite.models import build_model
from megatron_lite.models.bert import bert_metrics
from megatron_lite.models.relative import Memory
from megatron_lite.parallel import (
    ParallelConfigError,
    ParallelContext,
    validate_parallel_config,
    vocab_parallel_cross_entropy,
)
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.training.precision import autocast


def names_tokenizer(cfg: Config) -> bool:
    """Whether ``data.*`` names a tokenizer (a type and its files)."""
    d = cfg.data
    return bool(d.tokenizer_type and (d.vocab_file or d.tokenizer_model))


def tokenizer_from_config(cfg: Config) -> Tokenizer | None:
    """The tokenizer named in ``data.*``, or None when the config names none."""
    d = cfg.data
    if not names_tokenizer(cfg):
        return None
    return build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model)


def check_config(cfg: Config, world_size: int) -> None:
    """The config's own checks plus the TP x DP layout over ``world_size``: one
    :class:`ConfigError` naming every problem."""
    problems = cfg.problems()
    m, t = cfg.model, cfg.train
    try:
        validate_parallel_config(
            world_size, cfg.parallel.tensor_parallel_size, hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads, ffn_hidden_size=m.ffn_hidden_size,
            global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size)
    except ParallelConfigError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))


def error_sync(ctx: ParallelContext) -> Callable[[str | None], str | None]:
    """Exchange each rank's error message (or None); returns the first. Doubles as a barrier."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return lambda error: error

    def sync(error: str | None) -> str | None:
        errors = [None] * ctx.world_size
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    return sync


@dataclass
class Run:
    """What a command needs of a run: its config, grid, tokenizer, model and data.

    ``train_data`` / ``valid_data`` are None when not built (``data=False``, or no
    validation split).
    """

    cfg: Config
    ctx: ParallelContext
    tokenizer: Tokenizer | None
    model: nn.Module
    train_data: object | None = None
    valid_data: object | None = None

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step on each DP rank."""
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.ctx.dp_size)

    # ----------------------------------------------------------------------- data

    def datasets(self, seq_length: int | None = None, validation: bool = True):
        """``(train, valid)`` datasets of ``data.data_path`` at ``seq_length`` (default
        ``model.seq_length``); ``valid`` is None without ``validation`` or when the split
        is too small (a warning says so). Collective: rank 0 builds the index caches."""
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
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
        seq = seq_length or cfg.model.seq_length
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
        elif cfg.data.ordering == "consecutive":  # one lane per global-batch row
            make = lambda rng, n, name: ConsecutiveGPTDataset(  # noqa: E731
                indexed, rng, seq, t.global_batch_size, name=name)
        else:
            make = lambda rng, n, name: GPTDataset(  # noqa: E731
                indexed, rng, seq, n, t.seed, name=name, build=ctx.is_main, sync=sync)
        train = make(ranges[0], sizes[0], "train")
        valid = None
        if validation and t.eval_iters > 0:
            try:  # too small or empty: every rank gets the same error, and goes on without
                valid = make(ranges[1], sizes[1], "valid")
            except IndexedDataError as err:
                if ctx.is_main:
                    print(f"warning: no validation ({err})", flush=True)
        return train, valid

    def _bert_tokens(self) -> tuple[dict, np.ndarray | None]:
        """The special ids BERT samples need and, for whole-word masking, which ids are
        WordPiece continuations (``##x``)."""
        tok = self.tokenizer
        if tok is None or "[MASK]" not in tok.specials:
            raise ConfigError("BERT training needs a WordPiece data.tokenizer_type and "
                              "data.vocab_file (for the [CLS] [SEP] [MASK] [PAD] ids)")
        continuation = None
        if self.cfg.data.whole_word_masking:
            continuation = np.zeros(tok.vocab_size, dtype=bool)
            for piece, i in tok.vocab().items():
                continuation[i] = piece.startswith("##")
        return dict(tok.specials, vocab_size=tok.vocab_size), continuation

    def batches(self, dataset, consumed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches of ``dataset`` for this DP rank, after ``consumed`` samples."""
        collate = dict_collate if self.cfg.model.arch == "bert" else gpt_collate
        return micro_batches(dataset, consumed, self.cfg.train.micro_batch_size,
                             self.ctx.dp_rank, self.ctx.dp_size, collate)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def dp_mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the DP group (every rank gets it)."""
        return (all_reduce(value.detach().clone(), self.ctx.dp_group) / self.ctx.dp_size).item()

    # ----------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate_stream(self, split: str = "valid", max_tokens: int | None = None,
                        precision=None) -> dict:
        """Transformer-XL's evaluation: the split's token stream (or its first
        ``max_tokens`` targets) in consecutive segments of ``model.seq_length``, every
        target predicted exactly once, the memory (``model.mem_len``) carried from segment
        to segment. The stream is cut into ``micro_batch_size x DP`` lanes (each starts
        without memory). Returns loss, perplexity, targets and tokens/s. A model with learned
        positions can be read this way too (each segment alone): the baseline of the
        Transformer-XL comparison."""
        precision = precision or (lambda: autocast(self.cfg.train.precision, self.ctx.device))
        cfg, ctx, model = self.cfg, self.ctx, self.model
        indexed = IndexedDataset(cfg.data.data_path)
        index = {"train": 0, "valid": 1, "test": 2}[split]
        stream = TokenStream(indexed, split_ranges(indexed.num_documents, cfg.data.split)[index],
                             split)
        total = stream.num_tokens - 1  # every token after the first is a target
        if max_tokens:
            total = min(total, max_tokens)
        mb, seg = cfg.train.micro_batch_size, cfg.model.seq_length
        lanes = mb * ctx.dp_size
        lane = -(-total // lanes)  # targets per lane (the last lane may hold fewer)
        inputs = np.zeros((mb, lane), dtype=np.int64)
        labels = np.full((mb, lane), -100, dtype=np.int64)
        for row in range(mb):  # this DP rank's lanes
            start = (ctx.dp_rank * mb + row) * lane
            n = max(0, min(lane, total - start))
            if n:
                tokens = stream.read(start, n + 1)
                inputs[row, :n], labels[row, :n] = tokens[:-1], tokens[1:]
        inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
        # a learned-position model reads each segment alone (positions 0..seg-1)
        memory = Memory(cfg.model.mem_len) if cfg.model.position_embedding == "relative" else None
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, targets
        tick = time.perf_counter()
        for start in range(0, lane, seg):
            ids = inputs[:, start:start + seg].to(ctx.device)
            target = labels[:, start:start + seg].to(ctx.device)
            with precision():
                logits = model(ids, memory=memory)  # [mb, seg, V/tp]
            sums[0] += vocab_parallel_cross_entropy(logits.float(), target, ctx.tp_group,
                                                    vocab_size=cfg.model.vocab_size,
                                                    reduction="sum").double()
            sums[1] += (target != -100).sum()
        loss_sum, count = all_reduce(sums, ctx.dp_group).tolist()
        seconds = time.perf_counter() - tick
        loss = loss_sum / max(count, 1)
        return {"tokens": int(count), "segment": seg, "mem_len": cfg.model.mem_len,
                "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "tokens_per_sec": count / seconds}

    @torch.no_grad()
    def evaluate(self, split: str = "valid", iters: int | None = None,
                 precision: Callable[[], contextlib.AbstractContextManager] | None = None
                 ) -> dict:
        """Metrics of the model on ``iters`` global batches (default ``eval_iters``) of a
        split, the same samples at every TP/DP layout; ``global_batches`` and ``samples``
        say how much was read.

        GPT: ``loss`` and ``perplexity``. BERT: ``loss`` (MLM + NSP, what training
        minimizes), ``mlm_loss``, ``nsp_loss``, ``mlm_accuracy`` on the masked positions
        and ``nsp_accuracy`` (:meth:`BertModel.stats`). Leaves the model in eval mode.

        Args:
            split: ``valid`` or ``train``.
            iters: global batches to read.
            precision: the autocast context to run in (default: ``train.precision``'s).
        """
        cfg, ctx, model = self.cfg, self.ctx, self.model
        precision = precision or (lambda: autocast(cfg.train.precision, ctx.device))
        if cfg.model.position_embedding == "relative":  # None: the whole split
            t = cfg.train
            return self.evaluate_stream(
                split, iters and iters * t.global_batch_size * cfg.model.seq_length, precision)
        iters = iters or cfg.train.eval_iters
        data = self.valid_data if split == "valid" else self.train_data
        if data is None:
            raise IndexedDataError(f"the {split} split is empty")
        bert = cfg.model.arch == "bert"
        model.eval()
        # loss sum, micro-batches, samples, then BERT's stats summed over micro-batches
        sums = torch.zeros(3 + 6 * bert, dtype=torch.float64, device=ctx.device)
        for batch in itertools.islice(self.batches(data), iters * self.accum):
            batch = self.to_device(batch)
            with precision():
                loss = model(**batch)
            sums[:3] += torch.stack([loss.detach().double(), sums.new_tensor(1.0),
                                     sums.new_tensor(float(len(batch["input_ids"])))])
            if bert:
                sums[3:] += model.last_stats
        sums = all_reduce(sums, ctx.dp_group).tolist()
        loss, micro = sums[0] / sums[1], sums[1]
        out = {"global_batches": iters, "samples": int(sums[2]), "loss": loss}
        if bert:
            return {**out, **bert_metrics(sums[3:], micro)}
        return {**out, "perplexity": math.exp(min(loss, 50.0))}


def validation_metrics(result: dict) -> dict:
    """An :meth:`Run.evaluate` result as a training record's ``val_*`` keys: GPT
    ``val_loss`` and ``val_ppl``; BERT ``val_loss`` (MLM + NSP) and its parts and
    accuracies (its counts and speed left out)."""
    keys = ("loss", "perplexity", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")
    out = {f"val_{k}": result[k] for k in keys if k in result}
    if "val_perplexity" in out:
        out["val_ppl"] = out.pop("val_perplexity")
    return out


def build_run(cfg: Config, ctx: ParallelContext, *, training: bool = True,
              data: bool = True, make_model: Callable | None = None) -> Run:
    """Check ``cfg`` against ``ctx``'s grid, then build tokenizer, model and datasets.

    Sets ``model.vocab_size`` from the tokenizer when ``data`` names tokenizer files (a
    file or override that set another value is an error),
    ``model.sublayer_pattern`` to the order a sandwich or PAR key chose, and seeds ``ctx``
    with ``train.seed`` before the model is drawn (so a model is the same at every TP
    size). Raises one-line ``ValueError``s (config, layout, data, tokenizer).

    Args:
        cfg: the resolved config (changed in place: the tokenizer's vocab size).
        ctx: the parallel context of this job.
        training: for a training run the validation split is built only when the run
            evaluates (``train.eval_interval``); otherwise whenever ``eval_iters`` > 0.
        data: build the datasets (False: tokenizer and model only).
        make_model: ``make_model(model_cfg, ctx, device)`` instead of ``build_model`` (the
            PAR search's supernet), drawn after the same seeding.
    """
    tokenizer = tokenizer_from_config(cfg)
    if tokenizer is not None:
        where = cfg.explicit.get("model.vocab_size")
        if where and cfg.model.vocab_size != tokenizer.vocab_size:
            raise ConfigError(
                f"{where}: model.vocab_size={cfg.model.vocab_size} but the tokenizer "
                f"({cfg.data.vocab_file or cfg.data.tokenizer_model}) has "
                f"{tokenizer.vocab_size} tokens: leave model.vocab_size out (it is the "
                "tokenizer's) or use the tokenizer it was meant for")
        cfg.model.vocab_size = tokenizer.vocab_size
    check_config(cfg, ctx.world_size)
    m = cfg.model
    if (m.sandwich_coefficient or m.par_ratio) and not m.sublayer_pattern:
        m.sublayer_pattern = m.pattern  # written into config.yaml: later commands rebuild it
    if m.adaptive_span and not m.mem_len:
        m.mem_len = m.attn_span  # the memory holds the largest span
    if cfg.parallel.tensor_parallel_size != ctx.tp_size:
        raise ConfigError(f"parallel.tensor_parallel_size={cfg.parallel.tensor_parallel_size}"
                          f" but the job was started with TP={ctx.tp_size}")
    ctx.seed(cfg.train.seed)
    model = (make_model or build_model)(cfg.model, ctx, device=ctx.device)
    run = Run(cfg, ctx, tokenizer, model)
    if data:
        validation = not training or cfg.train.eval_interval > 0
        run.train_data, run.valid_data = run.datasets(validation=validation)
    return run
