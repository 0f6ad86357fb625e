"""Normalization parts (``model.normalization``): the norm of every sublayer, the final
one, and BERT's embedding and head norms: LayerNorm (GPT-2, BERT) or RMSNorm (Llama)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.registry import NORMS, Part


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm, Part):
    """``nn.LayerNorm`` over the hidden size, ``model.layernorm_epsilon`` (GPT-2, BERT)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=device)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module, Part):
    """Zhang & Sennrich 2019: ``w * x / sqrt(mean(x^2) + eps)`` over the hidden size, no
    bias, no centring; ``model.layernorm_epsilon`` is the eps (Llama's ``rms_norm_eps``).
    Computed in fp32 and cast back before the gain (as Llama's reference does)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.eps = cfg.layernorm_epsilon
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def norm(cfg: ModelConfig, device=None) -> nn.Module:
    """The normalization ``cfg`` chooses, over ``hidden_size``."""
    return NORMS.of(cfg)(cfg, device)
