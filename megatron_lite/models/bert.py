"""BERT: token + position + segment embeddings, a bidirectional stack, MLM and NSP heads.

``layernorm_order: pre`` is Megatron's BERT (LayerNorm before each sublayer, a final
LayerNorm, none on the embeddings; HF ``MegatronBertForPreTraining``); ``post`` is the
original BERT (LayerNorm after each residual and on the embeddings; HF
``BertForPreTraining``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.hooks import TrainingHook
from megatron_lite.models.embeddings import embedding, word_embedding
from megatron_lite.models.mlp import activation_fn
from megatron_lite.models.norms import norm
from megatron_lite.models.positions import position_scheme
from megatron_lite.models.transformer import Transformer, region_dropout
from megatron_lite.parallel import (
    ParallelContext,
    copy_to_tp_region,
    gather_sequence_for_head,
    linear_cross_entropy,
    mark_sequence_parallel_module,
    scatter_to_sequence_region,
)
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.parallel.layers import mark_tp


def _dense(n_in: int, n_out: int, std: float, device=None) -> nn.Linear:
    """A replicated ``nn.Linear`` initialized N(0, std), zero bias (the heads' layers)."""
    layer = nn.Linear(n_in, n_out, device=device)
    if layer.weight.device.type != "meta":
        nn.init.normal_(layer.weight, mean=0.0, std=std)
        nn.init.zeros_(layer.bias)
    return layer


class BertModel(nn.Module):
    """BERT for pretraining (masked LM + next-sentence prediction).

    Args:
        cfg: model section of the config.
        ctx: the parallel context (default: one process, no TP).
        device: where to allocate (``"meta"`` builds shapes only).
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None, device=None):
        super().__init__()
        ctx = ctx or ParallelContext()
        h, std = cfg.hidden_size, cfg.init_std
        self.cfg, self.tp_group, self.tp_size = cfg, ctx.tp_group, ctx.tp_size
        self.sp, self.rng = ctx.sequence_parallel, ctx.rng
        self.last_stats: torch.Tensor | None = None  # of the last forward with labels
        self.word = word_embedding(cfg, ctx, device)
        self.padded_vocab_size = self.word.num_embeddings
        self.positions = position_scheme(cfg)
        self.position = self.positions.input_table(device)
        self.tokentype = embedding(cfg.num_tokentypes, h, std, device)
        self.embed_ln = mark_sequence_parallel_module(norm(cfg, device), self.sp, ctx.tp_group) \
            if cfg.layernorm_order == "post" else None  # on the sequence shard
        self.transformer = Transformer(cfg, ctx, causal=False, device=device)
        # masked-LM head: dense + act + LayerNorm, then the tied, vocab-parallel decoder
        self.act = activation_fn(cfg.activation)
        self.lm_dense = _dense(h, h, std, device)
        self.lm_ln = norm(cfg, device)
        self.lm_bias = nn.Parameter(torch.zeros(self.word.weight.shape[0], device=device))
        mark_tp(self.lm_bias, 0, vocab_dim=0)
        # next-sentence head on [CLS]
        self.pooler = _dense(h, h, std, device)
        self.nsp = _dense(h, 2, std, device)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                mlm_labels: torch.Tensor | None = None, nsp_labels: torch.Tensor | None = None):
        """``(mlm_logits [b, s, V/tp], nsp_logits [b, 2])``, or the loss when labels are given.

        Args:
            input_ids: ``[b, s]`` token ids.
            token_type_ids: ``[b, s]`` segment ids (0 for A, 1 for B); zeros if None.
            attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
            mlm_labels: ``[b, s]`` original ids at masked positions, ``-100`` elsewhere.
            nsp_labels: ``[b]``, 0 = B follows A, 1 = B is random.
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.positions.embed(self.position, self.word(input_ids))
        x = x + self.tokentype(token_type_ids)  # [b, s, h]
        if self.sp.begin(input_ids.shape[1], self.tp_size):  # sequence parallelism
            x = scatter_to_sequence_region(x, self.tp_group)  # [b, s/tp, h]
        if self.embed_ln is not None:
            x = self.embed_ln(x)
        x = region_dropout(x, self.cfg.hidden_dropout, self.training, self.rng, self.sp)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]: True = attend
        x = self.transformer(x, mask)  # [b, s, h] (sequence parallelism: [b, s/tp, h])
        # the heads run replicated on all of the sequence: their gradient w.r.t. x is the
        # same on every TP rank, so the gather's backward keeps this rank's slice
        x = gather_sequence_for_head(x, self.sp, self.tp_group, partial_grad=False)
        nsp_logits = self.nsp(torch.tanh(self.pooler(x[:, 0])))  # [b, 2]
        if mlm_labels is None and nsp_labels is None:
            return self.mlm_logits(x), nsp_logits
        loss, parts, pred = self.loss(x, nsp_logits, mlm_labels, nsp_labels)
        self.last_stats = self.stats(pred, nsp_logits, mlm_labels, nsp_labels, parts)
        return loss

    def mlm_head(self, x: torch.Tensor) -> torch.Tensor:
        """The masked-LM head's transform (dense, activation, LayerNorm) of ``[..., h]``."""
        return self.lm_ln(self.act(self.lm_dense(x)))

    def mlm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, h]`` -> this rank's ``[b, s, V/tp]`` MLM logits (the tied decoder)."""
        return F.linear(copy_to_tp_region(self.mlm_head(x), self.tp_group), self.word.weight,
                        self.lm_bias)

    # what :meth:`stats` returns, in order
    STATS = ("mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count")

    @torch.no_grad()
    def stats(self, mlm_pred, nsp_logits, mlm_labels, nsp_labels, parts) -> torch.Tensor:
        """``[STATS]`` (float64) of one micro-batch: both losses, and the correct and total
        counts of MLM (``mlm_pred``: the argmax over the vocab-parallel logits of the
        masked positions, in order) and NSP. The forward with labels leaves them in
        ``last_stats``, so training logs the parts and accuracies of the loss it trains
        on."""
        out = torch.zeros(len(self.STATS), dtype=torch.float64, device=nsp_logits.device)
        if mlm_labels is not None:
            picked = mlm_labels != -100
            out[0], out[2], out[3] = parts["mlm"], (mlm_pred == mlm_labels[picked]).sum(), \
                picked.sum()
        if nsp_labels is not None:
            out[1] = parts["nsp"]
            out[4] = (nsp_logits.argmax(-1) == nsp_labels).sum()
            out[5] = nsp_labels.numel()
        return out

    def loss(self, x: torch.Tensor, nsp_logits: torch.Tensor,
             mlm_labels: torch.Tensor | None, nsp_labels: torch.Tensor | None):
        """``(MLM loss + NSP loss, {"mlm": ..., "nsp": ...}, MLM predictions)`` from the
        final hidden states ``x`` and the NSP logits. The MLM head runs on the masked
        positions only, and its decoder + vocab-parallel cross-entropy in chunks of
        ``model.loss_chunk_tokens`` tokens (:func:`linear_cross_entropy`, which also gives
        the argmax predictions): the full logits never exist."""
        parts, pred = {}, None
        if mlm_labels is not None:
            picked = mlm_labels != -100
            parts["mlm"], pred = linear_cross_entropy(
                self.mlm_head(x[picked]), self.word.weight, mlm_labels[picked], self.tp_group,
                bias=self.lm_bias, vocab_size=self.cfg.vocab_size,
                chunk_tokens=self.cfg.loss_chunk_tokens, predictions=True)
        if nsp_labels is not None:
            parts["nsp"] = F.cross_entropy(nsp_logits.float(), nsp_labels)
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}, pred

    def training_hooks(self, cfg) -> list[TrainingHook]:
        """Training's loss parts and accuracies (:class:`BertStatsHook`); with
        ``train.phase2_seq_length`` the two-phase schedule (:class:`BertPhase2Hook`)."""
        hooks: list[TrainingHook] = [BertStatsHook(self)]
        if cfg.train.phase2_seq_length:
            hooks.append(BertPhase2Hook(cfg))
        return hooks


def bert_metrics(stats, micro_batches: float) -> dict:
    """``mlm_loss``, ``nsp_loss`` (means over micro-batches), ``mlm_accuracy`` and
    ``nsp_accuracy`` from :meth:`BertModel.stats` summed over ``micro_batches``."""
    mlm_loss, nsp_loss, mlm_ok, mlm_n, nsp_ok, nsp_n = stats
    return {"mlm_loss": mlm_loss / micro_batches, "nsp_loss": nsp_loss / micro_batches,
            "mlm_accuracy": mlm_ok / max(mlm_n, 1), "nsp_accuracy": nsp_ok / max(nsp_n, 1)}


class BertStatsHook(TrainingHook):
    """A training step's ``mlm_loss``, ``nsp_loss`` and accuracies: the
    :meth:`BertModel.stats` its micro-batches left in ``last_stats``, summed over them and
    every DP rank (the loss it trains on, at no extra forward)."""

    def __init__(self, model: BertModel):
        self.model = model
        self.stats: torch.Tensor | None = None  # this step's, so far

    def after_micro_batch(self, trainer) -> None:
        self.stats = self.model.last_stats + (self.stats if self.stats is not None else 0)

    def step_metrics(self, trainer) -> dict:
        if self.stats is None:
            return {}
        stats = all_reduce(self.stats, trainer.ctx.dp_group).tolist()
        self.stats = None
        return bert_metrics(stats, trainer.accum * trainer.ctx.dp_size)


class BertPhase2Hook(TrainingHook):
    """BERT's two-phase schedule: from step ``int(train.phase2_start x train.max_steps)``
    on, samples of ``train.phase2_seq_length`` tokens (their own dataset; the samples of
    phase 2 counted from its start, so a resume continues them)."""

    def __init__(self, cfg):
        t = cfg.train
        self.seq_length, self.global_batch = t.phase2_seq_length, t.global_batch_size
        self.start = int(t.phase2_start * t.max_steps)
        self.begun = False  # a first step (also of a resumed run) may start in phase 2

    def describe(self, trainer) -> str:
        return (f"BERT two-phase schedule: from step {self.start} on (train.phase2_start), "
                f"samples of train.phase2_seq_length={self.seq_length} tokens")

    def before_step(self, trainer) -> None:
        first, self.begun = not self.begun, True
        if trainer.step == self.start or (first and trainer.step > self.start):
            if trainer.ctx.is_main:
                print(f"BERT phase 2 from step {self.start}: seq_length {self.seq_length}",
                      flush=True)
            trainer.train_data, _ = trainer.run.datasets(self.seq_length, validation=False)
            offset = trainer.consumed - self.start * self.global_batch
            trainer.train_iter = trainer.run.batches(trainer.train_data, offset)
