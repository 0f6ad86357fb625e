"""Normalization parts (``model.normalization``): the LayerNorm of every sublayer, the
final one, and BERT's embedding and head LayerNorms."""

from __future__ import annotations

from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.registry import NORMS, Part


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm, Part):
    """``nn.LayerNorm`` over the hidden size, ``model.layernorm_epsilon`` (GPT-2, BERT)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=device)


def norm(cfg: ModelConfig, device=None) -> nn.Module:
    """The normalization ``cfg`` chooses, over ``hidden_size``."""
    return NORMS.of(cfg)(cfg, device)
