"""GPT-2 and BERT built from the tensor-parallel layers and the registered parts.

Importing this package registers every part (:mod:`megatron_lite.models.registry`):
a new part's module is imported here.
"""

from __future__ import annotations

from megatron_lite.config import ModelConfig
from megatron_lite.models import (  # noqa: F401
    adaptive_span,
    mlp,
    norms,
    positions,
    relative,
    rotary,
)
from megatron_lite.models.attention import KVCache
from megatron_lite.models.bert import BertModel
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.layerdrop import set_layerdrop_key
from megatron_lite.models.registry import model_problems
from megatron_lite.parallel import ParallelContext


def build_model(cfg: ModelConfig, ctx: ParallelContext | None = None, device=None):
    """The model named by ``cfg.arch`` (``gpt`` or ``bert``)."""
    if cfg.arch == "gpt":
        return GPTModel(cfg, ctx, device)
    if cfg.arch == "bert":
        return BertModel(cfg, ctx, device)
    raise ValueError(f"model.arch={cfg.arch!r} is not one of gpt, bert")


__all__ = ["BertModel", "GPTModel", "KVCache", "build_model", "model_problems",
           "set_layerdrop_key"]
