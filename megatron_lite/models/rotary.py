"""Rotary position embedding (Su et al. 2021, RoFormer; Llama): ``model.position_embedding=rope``.

Nothing is added at the input; each attention sublayer rotates its queries and keys, per
head, by the angle ``m * theta_j`` of the token's position ``m``, with
``theta_j = rope_theta^(-2j/d)`` for ``j < d/2`` (``d`` the head size). The rotation
pairs element ``j`` with element ``j + d/2`` of a head (the *half-split* layout of
transformers' Llama, its ``rotate_half``): as a complex number ``x_j + i x_{j+d/2}``
times ``e^{i m theta_j}``. Scores then depend on positions only through ``m - n``.

transformers' ``LlamaForCausalLM`` stores q_proj/k_proj rows for this same layout (its
conversion script permutes Meta's interleaved checkpoints once, on the way in), so
converting to and from it needs no permutation of Q/K rows.

Under a KV cache the new queries and keys are rotated at their true positions (the cache
length on), and keys are cached rotated. ``rope_scaling=linear`` divides positions by
``rope_scaling_factor`` (position interpolation, Chen et al. 2023); other scalings
(dynamic NTK, YaRN, Llama 3's) are refused when a config asks for them.
"""

from __future__ import annotations

import torch

from megatron_lite.config import Config
from megatron_lite.models.positions import PositionScheme
from megatron_lite.models.registry import POSITIONS

ROPE_SCALINGS = ("none", "linear")
# NOTE: the angles of recent (positions, head size, theta, scale), shared by every attention
# sublayer: without it, one decoding step of a 30-layer model computes them 30 times (small
# ops that add up in decoding); constants, never differentiated, so sharing them is safe
_ANGLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the halves of the last dim: multiplication by ``i``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the angles of ``positions`` ``[s]``: each ``[s, head_dim]``
    (the ``d/2`` frequencies twice, for the two halves), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                            device=positions.device).float() / head_dim)
    if scale != 1.0:  # linear: position m at angle (m / scale) theta_j
        inv_freq = inv_freq / scale
    angles = positions.float()[:, None] * inv_freq[None, :]  # [s, d/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., s, d]`` by the angles whose ``cos``/``sin`` are ``[s, d]``."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


@POSITIONS.register("rope")
class RotaryPositions(PositionScheme):
    """Rotary positions on every attention sublayer's queries and keys (no parameters)."""

    requires = {"rope_theta": "rotary frequencies",
                "rope_scaling": "rotary position scaling",
                "rope_scaling_factor": "rotary position scaling"}

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        m, problems = cfg.model, []
        if m.seq_length > m.max_position_embeddings:
            problems.append(f"model.seq_length={m.seq_length} exceeds "
                            f"model.max_position_embeddings={m.max_position_embeddings}")
        if m.num_attention_heads and (m.hidden_size // m.num_attention_heads) % 2:
            problems.append(f"model.position_embedding=rope needs an even head size, not "
                            f"{m.hidden_size // m.num_attention_heads}")
        if m.rope_theta <= 0:
            problems.append(f"model.rope_theta={m.rope_theta} must be > 0")
        if m.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"model.rope_scaling={m.rope_scaling!r} is not built (one of "
                            f"{', '.join(ROPE_SCALINGS)})")
        if m.rope_scaling_factor <= 0 or (m.rope_scaling == "none" and m.rope_scaling_factor != 1):
            problems.append(f"model.rope_scaling_factor={m.rope_scaling_factor} needs "
                            "model.rope_scaling=linear and must be > 0")
        return problems

    def context_limit(self) -> int:
        return self.cfg.max_position_embeddings

    def angles(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` ``[length, d]`` of positions ``start .. start + length - 1``
        (eager: computed once for all the sublayers of a forward, see :data:`_ANGLES`)."""
        m = self.cfg
        scale = m.rope_scaling_factor if m.rope_scaling == "linear" else 1.0
        d = m.hidden_size // m.num_attention_heads
        if torch.compiler.is_compiling():  # traced into the graph, no Python-side state
            return rope_angles(torch.arange(start, start + length, device=device), d,
                               m.rope_theta, scale)
        key = (start, length, str(device), d, m.rope_theta, scale)
        if key not in _ANGLES:
            if len(_ANGLES) >= 16:
                _ANGLES.clear()
            _ANGLES[key] = rope_angles(torch.arange(start, start + length, device=device), d,
                                       m.rope_theta, scale)
        return _ANGLES[key]

    def attend(self, attn, q, k, v, mask, cache, index: int, *pos):
        start = cache.length if cache is not None else 0
        cos, sin = self.angles(start, q.shape[2], q.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return super().attend(attn, q, k, v, mask, cache, index, *pos)
