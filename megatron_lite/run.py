"""One way to build a run: check the config, then tokenizer -> model -> data.

    run = build_run(cfg, ctx)                  # train: model, train + validation data
    run = build_run(cfg, ctx, training=False)  # evaluate: the validation split in any case
    run = build_run(cfg, ctx, data=False)      # generate, convert, ...: tokenizer + model

Every command builds through here (train, evaluate, generate, and the commands that
build models without training), so a model, its data and its batches are made the same
way everywhere; the config is resolved first (:mod:`megatron_lite.resolve`). The
:class:`~megatron_lite.training.trainer.Trainer` adds what only training needs: the
optimizer, the engine (DDP or DeepSpeed ZeRO), checkpoints and the loop; evaluation is
:mod:`megatron_lite.training.evaluation`. Nothing here writes a file except the datasets'
index caches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.data.bert_dataset import BertDataset
from megatron_lite.data.blend import (
    BlendedDataset,
    blend_plan,
    check_sources_exist,
    parse_blend,
    split_source,
)
from megatron_lite.data.gpt_dataset import GPTDataset, check_vocab, split_ranges
from megatron_lite.data.indexed import IndexedDataError, IndexedDataset
from megatron_lite.data.loader import dict_collate, gpt_collate, micro_batches
from megatron_lite.data.stream import ConsecutiveGPTDataset
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.resolve import resolve_config


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
    notes: list[str] = field(default_factory=list)  # what resolving the config decided

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step on each DP rank."""
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.ctx.dp_size)

    # ----------------------------------------------------------------------- data

    def datasets(self, seq_length: int | None = None, validation: bool = True):
        """``(train, valid)`` datasets of ``data.data_path`` at ``seq_length`` (default
        ``model.seq_length``); ``valid`` is None without ``validation`` or when the split
        is too small (a warning says so). A blend of several corpora gives a
        :class:`~megatron_lite.data.blend.BlendedDataset` (its plan printed when a run
        starts). Collective: rank 0 builds the index caches."""
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        if not cfg.data.data_path:
            raise ConfigError("data.data_path is not set (a shard prefix, without .bin/.idx, "
                              "or a blend 'W1 PREFIX1 W2 PREFIX2')")
        seq = seq_length or cfg.model.seq_length
        # an eval "iteration" is one global batch, so validation reads the same samples at
        # every DP size
        train = self.split_data("train", t.max_steps * t.global_batch_size, seq,
                                check=seq_length is None)
        valid = None
        if validation and t.eval_iters > 0:
            try:  # too small or empty: every rank gets the same error, and goes on without
                valid = self.split_data("valid", t.eval_iters * t.global_batch_size, seq)
            except IndexedDataError as err:
                if cfg.data.valid_data_path:  # data named for validation: it must work
                    raise
                if ctx.is_main:
                    print(f"warning: no validation ({err})", flush=True)
        return train, valid

    def split_data(self, split: str, samples: int, seq: int | None = None,
                   check: bool = False):
        """The dataset of one split (train, valid or test) holding ``samples``: of
        ``data.valid_data_path`` / ``data.test_data_path`` when set (every document of
        it), else that split of ``data.data_path`` (``data.split``, per source of a blend).
        A blend's validation (and test) sources hold ``samples`` each: evaluation reads
        every source alone (:func:`~megatron_lite.training.evaluation.evaluate`).
        ``check``: that every token fits the vocab (and, for a blend, print its plan)."""
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        seq = seq or cfg.model.seq_length
        key, whole = split_source(cfg.data, split)
        try:
            sources = parse_blend(getattr(cfg.data, key.split(".")[1]), key)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        sync = error_sync(ctx)
        shards, error = {}, None
        try:
            check_sources_exist(sources, key)
            shards = {s.prefix: IndexedDataset(s.prefix) for s in sources}
            if ctx.is_main and (check or whole):  # separate data: its tokens too
                for shard in shards.values():
                    check_vocab(shard, cfg.model.vocab_size)
        except IndexedDataError as err:
            error = str(err) if str(err).startswith(key) else f"{key}: {err}"
        if (error := sync(error)) is not None:
            raise IndexedDataError(error)
        index = {"train": 0, "valid": 1, "test": 2}[split]
        ranges = {p: (0, ix.num_documents) if whole else
                  split_ranges(ix.num_documents, cfg.data.split)[index]
                  for p, ix in shards.items()}
        if cfg.model.arch == "bert":
            tokens, continuation = self._bert_tokens()
            make = lambda ix, rng, n: BertDataset(  # noqa: E731
                ix, rng, seq, n, t.seed, tokens, cfg.data, name=split,
                continuation=continuation, build=ctx.is_main, sync=sync)
        elif cfg.data.ordering == "consecutive":  # one lane per global-batch row
            make = lambda ix, rng, n: ConsecutiveGPTDataset(  # noqa: E731
                ix, rng, seq, t.global_batch_size, name=split)
        else:
            make = lambda ix, rng, n: GPTDataset(  # noqa: E731
                ix, rng, seq, n, t.seed, name=split, build=ctx.is_main, sync=sync)
        if len(sources) == 1:
            prefix = sources[0].prefix
            return make(shards[prefix], ranges[prefix], samples)

        def source_data(j, source, planned):
            n = max(planned, 1) if split == "train" else samples
            return make(shards[source.prefix], ranges[source.prefix], n)

        data = BlendedDataset(sources, samples, source_data, split, build=ctx.is_main,
                              sync=sync)
        if ctx.is_main and check:
            for line in blend_plan(data, shards, ranges, key):
                print(line, flush=True)
        return data

    def samples_per_source(self, data, consumed: int) -> dict[str, int]:
        """Samples drawn from each source (by prefix) by the first ``consumed`` of ``data``."""
        drawn = getattr(data, "drawn", None)
        return drawn(consumed) if drawn is not None else {self.cfg.data.data_path: consumed}

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


def build_run(cfg: Config, ctx: ParallelContext, *, training: bool = True,
              data: bool = True, make_model: Callable | None = None) -> Run:
    """Resolve ``cfg`` for ``ctx``'s grid (:func:`megatron_lite.resolve.resolve_config`,
    once), then build tokenizer, model and datasets. Seeds ``ctx`` with ``train.seed``
    before the model is drawn (so a model is the same at every TP size). Raises one-line
    ``ValueError``s (config, layout, data, tokenizer).

    Args:
        cfg: the config (resolved in place if it was not).
        ctx: the parallel context of this job.
        training: for a training run the validation split is built only when the run
            evaluates (``train.eval_interval``); otherwise whenever ``eval_iters`` > 0.
        data: build the datasets (False: tokenizer and model only).
        make_model: ``make_model(model_cfg, ctx, device)`` instead of ``build_model`` (the
            PAR search's supernet), drawn after the same seeding.
    """
    # the state it will hold: weights, gradients and the optimizer's when training
    tokenizer, run_notes = resolve_config(cfg, ctx, training=training and data)
    ctx.seed(cfg.train.seed)
    ctx.sequence_parallel.enabled = cfg.parallel.sequence_parallel and ctx.tp_size > 1
    model = (make_model or build_model)(cfg.model, ctx, device=ctx.device)
    run = Run(cfg, ctx, tokenizer, model, notes=run_notes)
    if data:
        validation = not training or cfg.train.eval_interval > 0
        run.train_data, run.valid_data = run.datasets(validation=validation)
    return run
