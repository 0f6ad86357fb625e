"""Position schemes: how token positions enter the model (``model.position_embedding``).

A scheme is a plain object built per model from its config (its parameters live on the
modules that use them, so the state dict names stay where they were). It is consulted
at four places, each a method with a neutral default:

- the model's input: :meth:`PositionScheme.input_table` (a learned table, held by the
  model) and :meth:`PositionScheme.embed` (add it to the token embeddings);
- the stack: :meth:`PositionScheme.stack_module` (parameters shared by every layer) and
  :meth:`PositionScheme.segment` (what each sublayer gets in one forward, e.g. a memory);
- each attention sublayer: :meth:`PositionScheme.attention_modules` (its own parameters),
  :meth:`PositionScheme.attention_input` (the positions its keys cover) and
  :meth:`PositionScheme.attend` (queries, keys and the mask before the core);
- the commands: :attr:`PositionScheme.carries_memory` and :meth:`PositionScheme.new_memory`
  (segments continue one another: evaluation reads a stream, generation keeps a memory).

This file holds the base and GPT-2/BERT's learned absolute positions; Transformer-XL's
relative positions are :mod:`megatron_lite.models.relative`, Llama's rotary ones
:mod:`megatron_lite.models.rotary`.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import Config, ModelConfig
from megatron_lite.models.embeddings import embedding
from megatron_lite.models.registry import POSITIONS, Part
from megatron_lite.parallel import ParallelContext


class Segment:
    """One forward pass through the stack: the extra tensors each sublayer is given
    (passed positionally, so activation checkpointing sees them as inputs)."""

    def inputs(self, index: int, layer: nn.Module, x: torch.Tensor) -> tuple:
        return ()

    def close(self) -> None:
        """The forward has passed every sublayer."""


class PositionScheme(Part):
    """The neutral scheme: no positions anywhere (a subclass adds what it needs)."""

    carries_memory = False  # one segment continues the previous one (a Memory)
    stack_attr = "rel"  # where the stack holds :meth:`stack_module` (state-dict name)

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    # -- the model's input
    def input_table(self, device=None) -> nn.Module | None:
        return None

    def embed(self, table: nn.Module | None, x: torch.Tensor, cache=None,
              memory=None) -> torch.Tensor:
        """Token embeddings ``x`` ``[b, s, h]`` plus positions; ``cache`` (a KVCache) says
        where ``x`` starts."""
        if memory is not None:
            raise ValueError(f"a memory needs a position scheme that carries one (not "
                             f"model.position_embedding={self.name})")
        return x

    # -- the stack
    def stack_module(self, ctx: ParallelContext, device=None) -> nn.Module | None:
        return None

    def segment(self, stack: nn.Module, memory=None) -> Segment:
        return Segment()

    def new_memory(self):
        """A fresh memory for a run of segments, or None (each segment alone)."""
        return None

    def context_limit(self) -> int:
        """The most positions one forward may take."""
        return self.cfg.seq_length

    def attention_flops(self, seq: int) -> float:
        """Forward FLOPs per token of one attention sublayer at ``seq`` tokens (Narayanan
        et al. 2021): the QKV and output projections ``8h^2``, scores and context ``4sh``;
        with grouped-query attention the K/V projections are ``4h g d`` (``g`` groups)."""
        h, m = self.cfg.hidden_size, self.cfg
        kv = 2 * m.query_groups * (h // m.num_attention_heads)  # K and V rows
        return 4 * h * h + 2 * h * kv + 4 * seq * h

    def decoding_memory(self, window: int):
        """The memory generation decodes with (``window``: the context it may use when the
        config sets no memory length), or None (a KV cache)."""
        return None

    # -- one attention sublayer
    def attention_modules(self, attn: nn.Module, ctx: ParallelContext, device=None) -> None:
        """Add the sublayer's own parameters to ``attn`` (none here)."""

    def attention_input(self, x: torch.Tensor, attn: nn.Module, pos: tuple):
        """``(source, attention inputs)``: what the sublayer normalizes and attends over,
        and the tensors passed on to :meth:`attend`."""
        return x, pos

    def attend(self, attn: nn.Module, q, k, v, mask, cache, index: int, *pos):
        """``(q, k, v, mask, causal)`` for the core; keys and values are extended with
        ``cache`` (incremental decoding), where the queries are the last positions."""
        causal = attn.causal
        if cache is not None:
            s, past = q.shape[2], cache.length
            k, v = cache.extend(index, k, v)  # [b, heads/tp, past + s, d]
            if causal and past:  # the queries are the last s positions: i sees past + i
                causal = False
                if s > 1:
                    mask = torch.ones(s, past + s, dtype=torch.bool, device=q.device).tril(past)
        return q, k, v, mask, causal


@POSITIONS.register("learned")
class LearnedPositions(PositionScheme):
    """GPT-2 and BERT: a learned table of ``max_position_embeddings`` rows, N(0, std),
    added to the token embeddings at the model's input."""

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        m = cfg.model
        if m.seq_length > m.max_position_embeddings:
            return [f"model.seq_length={m.seq_length} exceeds "
                    f"model.max_position_embeddings={m.max_position_embeddings}"]
        return []

    def context_limit(self) -> int:
        return self.cfg.max_position_embeddings

    def input_table(self, device=None) -> nn.Module:
        m = self.cfg
        return embedding(m.max_position_embeddings, m.hidden_size, m.init_std, device)

    def embed(self, table, x, cache=None, memory=None):
        super().embed(table, x, cache, memory)  # refuses a memory
        s = x.shape[1]
        start = cache.length if cache is not None else 0
        if start + s > self.cfg.max_position_embeddings:
            raise ValueError(f"{start + s} positions exceed model.max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}")
        return x + table(torch.arange(start, start + s, device=x.device))


def position_scheme(cfg: ModelConfig) -> PositionScheme:
    """The scheme ``cfg`` chooses, built for it."""
    return POSITIONS.of(cfg)(cfg)
