"""Pipeline parallelism on ``torch.distributed.pipelining`` (Narayanan et al. 2021).

Each rank holds its pipeline rank's model chunks (:mod:`megatron_lite.parallel.pipeline`
says which layers): a :class:`PipelineModel`, the full GPT model's modules under the
full model's names (``wte.weight``, ``transformer.layers.7.ln.weight``, ...), so the
optimizer, its weight-decay groups and the sharded checkpoints (global names: saved at
one PP size, loaded at another or at PP=1) see an ordinary model. The first chunk holds
the embeddings, the last the final norm; the head is tied to the input embedding, so
the last stage holds a copy of ``wte`` (Megatron's embedding group): both copies start
equal (drawn by the same seeded build) and their gradients are summed between the two
stages before the optimizer step, so they stay bitwise equal; the last stage's copy is
not saved twice (``pipeline_copy``).

:class:`PipelineEngine` runs one optimizer step's micro-batches through torch's
``Schedule1F1B`` / ``ScheduleInterleaved1F1B`` / ``ScheduleGPipe`` with one
``PipelineStage`` per chunk, then averages the gradients over DP (one flat all-reduce
per bucket, after the schedule) and sums the tied embedding's; with the distributed
optimizer (``parallel.distributed_optimizer``, one per stage over its own parameters)
the micro-batches accumulate into its fp32 gradient buffer, the tied embedding's whole
gradient is summed there, and its bucketed reduce-scatters over DP start after the
schedule (no overlap with the pipeline's backward). The last stage computes
the loss; the step's loss is then broadcast over the pipeline, so every rank logs the
same line. Evaluation (``model(input_ids, labels)``) is a forward through the stages
with plain sends and receives, the loss broadcast the same way.

Sequence parallelism (``parallel.sequence_parallel``): the step (or evaluation) decides
it once from the sequence length (``SequenceParallel.begin``), the first chunk scatters
the embeddings' output over TP as :class:`GPTModel` does, and every stage boundary
carries each TP rank's ``[b, s/tp, h]`` shard, so the point-to-point bytes divide by TP
(Megatron's way); the head gathers the sequence on the last stage. bf16 parameters
(``train.params_dtype=bf16``, :class:`~megatron_lite.training.mixed.MainParams`): the
stages pass bf16 activations, and the tied embedding's fp32 main gradients are what
the embedding group sums.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.nn.modules.module import register_module_module_registration_hook

from megatron_lite.config import Config, ConfigError, ModelConfig
from megatron_lite.models import build_model
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.transformer import Sublayer, Transformer, region_dropout
from megatron_lite.parallel import ParallelContext, scatter_to_sequence_region
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.parallel.pipeline import chunk_layers, parse_layers
from megatron_lite.parallel.random import checkpoint_nonreentrant

SCHEDULE_CLASSES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
                    "gpipe": ScheduleGPipe}


class Chunk(nn.Module):
    """One model chunk (a pipeline stage of torch's schedule): consecutive layers, plus
    the embeddings on the first chunk and the final norm on the last."""

    def __init__(self, model: PipelineModel, layers: range, first: bool, last: bool):
        super().__init__()
        self.index = list(layers)
        self.first, self.last = first, last
        self.cfg, self.rng, self.positions = model.cfg, model.rng, model.positions
        self.sp, self.tp_group = model.sp, model.tp_group
        self.layers = nn.ModuleList(model.transformer.layers[str(i)] for i in layers)
        if first:
            self.wte = model.wte
            self.wpe = getattr(model, "wpe", None)
        self.final_ln = getattr(model.transformer, "final_ln", None) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[b, s]`` (first chunk) or hidden states ``[b, s, h]`` -> hidden
        states (after the final norm on the last chunk). While sequence parallelism is
        active (``sp.begin`` was called for the step) the hidden states between chunks
        are this TP rank's sequence shard ``[b, s/tp, h]``: the stages send 1/TP of the
        activations (Megatron's way), the embedding scatters as in :class:`GPTModel`."""
        training = self.layers[0].training if len(self.layers) else self.training
        if self.first:
            if self.sp.active and self.wpe is None:  # the embedding's reduction scatters
                x = self.positions.embed(None, self.wte(x, scatter_sequence=True))
            else:
                x = self.positions.embed(self.wpe, self.wte(x))
                if self.sp.active:
                    x = scatter_to_sequence_region(x, self.tp_group)
            x = region_dropout(x, self.cfg.hidden_dropout, training, self.rng, self.sp)
        recompute = self.cfg.activation_checkpointing == "full" and training \
            and torch.is_grad_enabled()
        for i, layer in zip(self.index, self.layers, strict=True):
            z = layer.core_inputs()
            if recompute:
                x = checkpoint_nonreentrant(layer, self.rng, x, None, None, i, z)
            else:
                x = layer(x, None, None, i, z)
        return self.final_ln(x) if self.final_ln is not None else x


class PipelineModel(nn.Module):
    """This pipeline rank's share of a GPT model under the full model's parameter names.

    ``chunks`` are its model chunks (stage indices ``pp_rank + k x P``); ``forward`` with
    labels is a pipelined forward of one micro-batch that returns the mean loss on every
    rank of the pipeline (evaluation). ``global_names``: every name of the full model
    (what a checkpoint of the whole pipeline holds).
    """

    logits = GPTModel.logits  # the tied head: [b, s, h] -> this TP rank's logits
    loss = GPTModel.loss
    output_weight = GPTModel.output_weight  # tied only (an untied head is refused by config)
    output_layer = None

    def __init__(self, full: GPTModel, cfg: ModelConfig, ctx: ParallelContext,
                 chunks: list[range], stage_ids: list[int], num_stages: int):
        super().__init__()
        self.cfg, self.ctx, self.tp_group, self.rng = cfg, ctx, ctx.tp_group, ctx.rng
        self.tp_size, self.sp = ctx.tp_size, ctx.sequence_parallel  # read by logits
        self.positions = full.positions
        self.padded_vocab_size = full.padded_vocab_size
        self.global_names = {n for n, _ in full.named_parameters()} | \
            {n for n, _ in full.named_buffers()}
        self.stage_ids, self.num_stages = stage_ids, num_stages
        first, last = 0 in stage_ids, num_stages - 1 in stage_ids
        if first or last:
            self.wte = full.wte
        if first and full.wpe is not None:
            self.wpe = full.wpe
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleDict(
            {str(i): full.transformer.layers[i] for r in chunks for i in r})
        if last and full.transformer.final_ln is not None:
            self.transformer.final_ln = full.transformer.final_ln
        if last and not first:  # the tied head's copy: saved by the first stage
            self.wte.weight.pipeline_copy = True
        # not submodules: they share this module's parameters
        self.chunks = [Chunk(self, r, s == 0, s == num_stages - 1)
                       for r, s in zip(chunks, stage_ids, strict=True)]

    @property
    def has_loss(self) -> bool:
        """Whether this rank runs the last stage (the head and the loss)."""
        return self.num_stages - 1 in self.stage_ids

    def train(self, mode: bool = True):
        super().train(mode)
        for c in self.chunks:
            c.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache=None, memory=None) -> torch.Tensor:
        if labels is None or cache is not None or memory is not None:
            raise ValueError("a pipelined model computes losses only (evaluate); generate "
                             "and convert load its checkpoint at pipeline_parallel_size=1")
        ctx, p = self.ctx, self.ctx.pp_size
        b, s = input_ids.shape
        h = self.cfg.hidden_size
        if self.sp.begin(s, ctx.tp_size):  # the stages pass sequence shards
            s //= ctx.tp_size
        x = None
        for stage in range(self.num_stages):
            if stage % p != ctx.pp_rank:
                continue
            chunk = self.chunks[self.stage_ids.index(stage)]
            if stage == 0:
                x = input_ids
            else:  # sent as fp32; bf16 weights (train.params_dtype) take it back exactly
                x = torch.empty(b, s, h, dtype=torch.float32, device=ctx.device)
                dist.recv(x, ctx.pp_ranks[(stage - 1) % p])
                x = x.to(next(chunk.parameters()).dtype)
            x = chunk(x)
            if stage < self.num_stages - 1:
                dist.send(x.float().contiguous(), ctx.pp_ranks[(stage + 1) % p])
        loss = self.loss(x, labels).detach().float() if self.has_loss else \
            torch.zeros((), device=ctx.device)
        return all_reduce(loss, ctx.pp_group)  # from the last stage to every rank


def build_pipeline_model(cfg: Config, model_cfg: ModelConfig, ctx: ParallelContext,
                         device=None) -> PipelineModel:
    """This rank's :class:`PipelineModel`. The GPT model is drawn in one process's order
    (the same seeded stream, so every layer starts as at PP=1), but each module this rank
    does not run goes to the meta device the moment it is built (:func:`_only_stage`):
    besides its own layers a rank holds one other layer (or the embedding) at a time."""
    par = cfg.parallel
    p, v = ctx.pp_size, par.virtual_pipeline_size
    chunks = chunk_layers(model_cfg.num_layers, p * v, parse_layers(par.pipeline_layers))
    stage_ids = [ctx.pp_rank + k * p for k in range(v)]
    # a layer of the pattern "sf" * N is two sublayers: chunk layers -> sublayer indices
    mine = [range(2 * chunks[s].start, 2 * chunks[s].stop) for s in stage_ids]
    first, last = 0 in stage_ids, p * v - 1 in stage_ids
    keep = {i for r in mine for i in r}
    with _only_stage(keep, embeddings=first or last, positions=first, final=last):
        full = build_model(model_cfg, ctx, device=device)
    return PipelineModel(full, model_cfg, ctx, mine, stage_ids, p * v)


@contextlib.contextmanager
def _only_stage(keep: set[int], embeddings: bool, positions: bool, final: bool):
    """While a GPT model is built: its sublayers not in ``keep`` (and the word embedding,
    the position table, the final norm where this stage has none) move to the meta device
    as they are registered, after their weights were drawn (the stream stays the one
    process's)."""
    def hook(parent: nn.Module, name: str, module: nn.Module | None):
        if module is None:
            return None
        if isinstance(module, Sublayer) and isinstance(parent, nn.ModuleList):
            drop = int(name) not in keep
        else:
            drop = (name == "wte" and isinstance(parent, GPTModel) and not embeddings) or \
                (name == "wpe" and isinstance(parent, GPTModel) and not positions) or \
                (name == "final_ln" and isinstance(parent, Transformer) and not final)
        return module.to("meta") if drop else None

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def pipelined_build(cfg: Config, ctx: ParallelContext, build: Callable | None
                    ) -> Callable | None:
    """The model builder of a run (``build_run``'s ``make_model``): ``build`` as it is
    without pipelining, else :func:`build_pipeline_model` of ``cfg``."""
    if ctx.pp_size == 1:
        return build
    if build is not None:
        raise ConfigError(f"parallel.pipeline_parallel_size={ctx.pp_size}: this command's "
                          "model (the search's supernet) is not pipelined")
    return functools.partial(build_pipeline_model, cfg)


class PipelineEngine:
    """One optimizer step's forward and backward through the schedule.

    Args:
        model: this rank's :class:`PipelineModel`.
        cfg: the config (``parallel.pipeline_schedule``, ``ddp_bucket_mb``).
        ctx: the grid.
        accum: micro-batches per step (``global / (micro x DP)``).
        distopt: the run's :class:`~.distopt.DistributedOptimizer` over this stage's
            parameters (``parallel.distributed_optimizer=true``), or None (DDP's average).
    """

    def __init__(self, model: PipelineModel, cfg: Config, ctx: ParallelContext, accum: int,
                 distopt=None):
        self.model, self.cfg, self.ctx, self.accum = model, cfg, ctx, accum
        self.distopt = distopt
        self.bucket = int(cfg.parallel.ddp_bucket_mb * 2**20)
        # NOTE: shapes are inferred by the stages at the first step (torch 2.13: stages
        # given static input_args/output_args without the gradients' metadata ran the
        # first stage's backward with no output gradient)
        self.stages = [PipelineStage(chunk, sid, model.num_stages, ctx.device,
                                     group=ctx.pp_group)
                       for sid, chunk in zip(model.stage_ids, model.chunks, strict=True)]
        cls = SCHEDULE_CLASSES[cfg.parallel.pipeline_schedule]
        stage = self.stages if cls is ScheduleInterleaved1F1B else self.stages[0]
        # the loss of a micro-batch is divided by their count here, as without
        # pipelining (the trainer's loss / accum), so the schedule scales nothing
        self.schedule = cls(stage, n_microbatches=accum, loss_fn=self._loss,
                            scale_grads=False)
        # NOTE: a process's first step runs a metadata inference (a forward and backward
        # of real tensors) before the micro-batches; torch 2.13 forks the default
        # generator around it but not this house's TP RNG streams (attention dropout
        # under TP, sequence-parallel dropout), which it would advance: a resumed
        # process would then draw other masks than the uninterrupted one (not bitwise)
        initialize = self.schedule._initialize_pp_stages

        def keep_tp_streams(*args, **kwargs):
            states = ctx.rng.get_states()
            try:
                return initialize(*args, **kwargs)
            finally:
                ctx.rng.set_states(states)

        self.schedule._initialize_pp_stages = keep_tp_streams

    def _loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(output, labels) / self.accum

    def step(self, batches: list[dict]) -> torch.Tensor:
        """Forward and backward of ``batches`` (this step's micro-batches); returns the
        sum of their mean losses on every rank. Gradients are left averaged over DP,
        the tied embedding's summed over its two stages."""
        ctx, model = self.ctx, self.model
        ids = torch.cat([b["input_ids"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        first = 0 in model.stage_ids
        # every rank of the pipeline holds the step's batches: the sequence length
        # decides sequence parallelism for all its stages
        model.sp.begin(ids.shape[1], ctx.tp_size)
        losses: list[torch.Tensor] = []
        args = (ids,) if first else ()
        # the distributed optimizer accumulates every micro-batch into its gradient
        # buffer; its reduce-scatters start after the schedule (finish_grad_sync)
        with self.distopt.no_sync() if self.distopt is not None else contextlib.nullcontext():
            if model.has_loss:
                self.schedule.step(*args, target=labels, losses=losses, return_outputs=False)
            else:
                self.schedule.step(*args, return_outputs=False)
        total = (torch.stack([x.detach().float() for x in losses]).sum() * self.accum
                 if losses else torch.zeros((), device=ctx.device))
        self.reduce_grads()
        return all_reduce(total, ctx.pp_group)

    def reduce_grads(self) -> None:
        """DP: average every gradient (flat buckets); PP: sum the tied embedding's two
        copies' gradients (first and last stage). Under ``train.params_dtype=bf16`` the
        gradients are the fp32 ``main_grad`` s (:class:`~megatron_lite.training.mixed.
        MainParams`): the tied pair's is summed here, the DP average is MainParams'.
        The distributed optimizer: the tied pair's whole fp32 gradient in its buffer is
        summed here, before its DP reduce-scatter (the trainer's ``finish_grad_sync``),
        which is the DP average."""
        ctx, model, do = self.ctx, self.model, self.distopt
        if hasattr(model, "wte") and ctx.embedding_group is not None:
            w = model.wte.weight
            grad = do.main_grad.get(id(w)) if do is not None else \
                getattr(w, "main_grad", w.grad)
            if grad is not None:
                all_reduce(grad, ctx.embedding_group)
        if ctx.dp_size == 1 or do is not None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for g in [*grads, None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= self.bucket):
                flat = torch._utils._flatten_dense_tensors(bucket)
                all_reduce(flat, ctx.dp_group).div_(ctx.dp_size)
                for dst, src in zip(bucket, torch._utils._unflatten_dense_tensors(
                        flat, bucket), strict=True):
                    dst.copy_(src)
                bucket, size = [], 0
