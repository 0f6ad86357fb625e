"""Adaptive attention span (Sukhbaatar et al. 2019), on Transformer-XL's relative attention.

Each head ``h`` learns ``z_h = S * c_h`` (``c_h`` in [0, 1], ``S = model.attn_span``). The
attention weights of a query at distance ``x`` from a key are multiplied after the
softmax by the soft mask ``m(x) = clamp((R + z_h - x) / R, 0, 1)`` (``R`` the ramp) and
renormalised, as in the author code. The L1 penalty ``lambda * sum z`` is added to the
training loss and logged apart (``span_loss``), and every head's span is logged and
plotted (``spans.png``): :class:`SpanHook`.

The compute is really saved: before the attention of a sublayer, the memory positions
older than ``max_h z_h + R`` (the largest span of the layer, all-reduced with MAX over
the TP group so every rank keeps the same keys) are dropped in chunks of 64, before the
key/value projections. Those keys had mask 0, so the result is unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from megatron_lite.config import Config, ModelConfig
from megatron_lite.files import atomic_path
from megatron_lite.hooks import TrainingHook
from megatron_lite.models.attention import AttentionCore
from megatron_lite.models.registry import ATTENTION_CORES
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import MAX, all_gather, all_reduce
from megatron_lite.parallel.layers import mark_tp
from megatron_lite.parallel.state import group_size
from megatron_lite.parallel.utils import divide

TRIM_CHUNK = 64


def span_mask(distance: torch.Tensor, z: torch.Tensor, ramp: int) -> torch.Tensor:
    """``clamp((R + z - x) / R, 0, 1)`` for distances ``x`` and spans ``z`` (broadcast)."""
    return ((ramp + z - distance) / ramp).clamp(0.0, 1.0)


@ATTENTION_CORES.register("adaptive_span")
class AdaptiveSpan(AttentionCore):
    """The attention core of ``model.adaptive_span=true``: the spans of one attention
    sublayer's heads (this TP rank's ``heads/tp``) and attention through their masks.

    Args:
        cfg: ``attn_span``, ``adaptive_span_ramp``, ``adaptive_span_init``.
        ctx: the parallel context (the heads are split over its TP group).
    """

    @classmethod
    def pipeline_refusal(cls, cfg: Config) -> str | None:
        return "its span penalty reads every layer's spans in one loss"

    attr = "adaptive"  # SelfAttention.adaptive (the state-dict name of the spans)

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        m, problems = cfg.model, []
        if m.position_embedding != "relative":
            problems.append("model.adaptive_span needs model.position_embedding=relative "
                            "(the span reaches back into Transformer-XL's memory)")
        if m.attn_span <= 0:
            problems.append("model.adaptive_span needs model.attn_span > 0 (the largest span)")
        elif m.adaptive_span_ramp >= m.attn_span or m.adaptive_span_ramp <= 0:
            problems.append(f"model.adaptive_span_ramp={m.adaptive_span_ramp} must be in (0, "
                            f"model.attn_span={m.attn_span})")
        if m.mem_len and m.mem_len != m.attn_span:
            problems.append(f"model.mem_len={m.mem_len} with model.attn_span={m.attn_span}: the "
                            "memory must hold the largest span (leave mem_len 0 to set it)")
        if not 0.0 <= m.adaptive_span_init <= 1.0:
            problems.append(f"model.adaptive_span_init={m.adaptive_span_init} is a fraction "
                            "of model.attn_span, in [0, 1]")
        return problems

    @classmethod
    def resolve(cls, m: ModelConfig) -> None:
        if not m.mem_len:
            m.mem_len = m.attn_span  # the memory holds the largest span

    @classmethod
    def describe(cls, m: ModelConfig) -> str:
        return (f"adaptive attention span (Sukhbaatar et al. 2019): each head learns its span "
                f"up to model.attn_span={m.attn_span}, starting at "
                f"{m.adaptive_span_init * m.attn_span:g} (model.adaptive_span_init="
                f"{m.adaptive_span_init:g}), ramp {m.adaptive_span_ramp}, L1 penalty "
                f"{m.adaptive_span_loss:g} x sum of spans")

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, device=None):
        super().__init__(cfg, ctx, device)
        local = divide(cfg.num_attention_heads, group_size(ctx.tp_group),
                       "model.num_attention_heads")
        self.span, self.ramp, self.tp_group = cfg.attn_span, cfg.adaptive_span_ramp, ctx.tp_group
        # c_h = z_h / S, as the author code keeps it; the same start on every head
        self.fraction = nn.Parameter(torch.full((local,), cfg.adaptive_span_init,
                                                device=device))
        mark_tp(self.fraction, 0)

    def z(self) -> torch.Tensor:
        """``[heads/tp]`` spans in positions (the fraction clamped to [0, 1] here too, so a
        parameter the optimizer pushed out of range never acts out of range)."""
        return self.fraction.clamp(0.0, 1.0) * self.span

    def mask(self, qlen: int, klen: int, z: torch.Tensor | None = None,
             device=None) -> torch.Tensor:
        """``[heads/tp, qlen, klen]`` soft mask for spans ``z`` (default :meth:`z`); query
        ``i`` sits at ``klen - qlen + i``."""
        z = self.z() if z is None else z
        i = torch.arange(qlen, device=device)[:, None] + (klen - qlen)
        j = torch.arange(klen, device=device)[None, :]
        distance = (i - j).float()  # negative (future) keys are masked causally elsewhere
        return span_mask(distance[None], z[:, None, None], self.ramp)

    def inputs(self) -> torch.Tensor:
        """The spans, computed before the sublayer (see :meth:`AttentionCore.inputs`)."""
        return self.z()

    def forward(self, q, k, v, bias, causal, z=None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias), times the heads' span masks (spans ``z``),
        renormalised (as the author code: ``a * m / (sum(a * m) + 1e-8)``), dropout, times v.
        ``bias`` holds the relative position scores and the causal mask (``-inf``)."""
        z = self.z() if z is None else z
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_dim ** 0.5 + bias
        probs = torch.softmax(scores.float(), dim=-1)  # [b, heads/tp, qlen, klen]
        probs = probs * self.mask(q.shape[2], k.shape[2], z, q.device)
        probs = (probs / (probs.sum(-1, keepdim=True) + 1e-8)).to(v.dtype)
        probs = self.rng.dropout(probs, self.dropout_p, self.training)
        return torch.matmul(probs, v)  # [b, heads/tp, qlen, d]

    def memory_needed(self, mlen: int) -> int:
        return self.keep(mlen)

    @torch.no_grad()
    def keep(self, mlen: int) -> int:
        """How many of the ``mlen`` memory positions the layer still needs: those within
        the layer's largest span (+ ramp) of the first query, trimmed in chunks of 64."""
        largest = all_reduce(self.z().max().detach().clone(), self.tp_group, MAX)
        reach = math.ceil(float(largest)) + self.ramp  # keys farther than this have mask 0
        trim = max(0, mlen - reach) // TRIM_CHUNK * TRIM_CHUNK
        return mlen - trim

    def penalty(self) -> torch.Tensor:
        """This rank's part of ``sum z`` (its heads)."""
        return self.z().sum()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.fraction.clamp_(0.0, 1.0)

    @torch.no_grad()
    def all_spans(self) -> torch.Tensor:
        """Every head's span (collective over TP)."""
        return all_gather(self.z().detach(), self.tp_group, dim=0)

    def training_hooks(self, cfg) -> list[TrainingHook]:
        """:class:`SpanHook` (every sublayer's span offers it; the Trainer keeps one)."""
        return [SpanHook(cfg)]


def span_modules(model: nn.Module) -> list[AdaptiveSpan]:
    """The model's adaptive-span modules, bottom to top."""
    return [m for m in model.modules() if isinstance(m, AdaptiveSpan)]


class SpanHook(TrainingHook):
    """Adaptive span in training: the penalty ``model.adaptive_span_loss x sum z`` added to
    each micro-batch's loss (logged apart as ``span_loss``, the value the step trains
    with, over every head); each ``z_h`` clamped to ``[0, S]`` after the optimizer step
    (under ZeRO in the fp32 masters too); ``span_mean`` / ``span_max`` per layer in the
    logged records; ``spans.png`` at the end."""

    def __init__(self, cfg):
        self.weight, self.max_span = cfg.model.adaptive_span_loss, cfg.model.attn_span
        self.lr = cfg.optim.lr
        self.spans: list[AdaptiveSpan] = []
        self.logged: dict = {}
        self.start: tuple[int, list[list[float]]] | None = None  # this process's first step

    def setup(self, trainer) -> None:
        self.spans = span_modules(trainer.model)  # bottom to top

    def penalty(self) -> torch.Tensor | float:
        """``lambda * sum z`` over this rank's heads."""
        return self.weight * sum(s.penalty() for s in self.spans)

    def before_step(self, trainer) -> None:
        if self.start is None:  # where this process starts (a resume: its checkpoint's)
            self.start = (trainer.step, [s.all_spans().tolist() for s in self.spans])
        with torch.no_grad():  # the penalty this step trains with, over every head
            value = torch.as_tensor(self.penalty(), device=trainer.ctx.device).detach()
            self.logged = {"span_loss": all_reduce(value.clone(), trainer.ctx.tp_group).item()}

    def extra_loss(self, trainer) -> torch.Tensor | float:
        return self.penalty()

    def after_optimizer_step(self, trainer) -> None:
        if trainer.sharded is not None:  # z_h in [0, S], sharded masters included
            trainer.sharded.clamp_([s.fraction for s in self.spans], 0.0, 1.0)
        else:
            for span in self.spans:
                span.clamp_()

    def step_metrics(self, trainer) -> dict:
        return self.logged

    def log_metrics(self, trainer) -> dict:
        """Per layer, the mean and largest span of its heads (collective over TP)."""
        spans = [s.all_spans() for s in self.spans]
        return {"span_mean": [round(float(z.mean()), 2) for z in spans],
                "span_max": [round(float(z.max()), 2) for z in spans]}

    def at_end(self, trainer) -> None:
        spans = [s.all_spans().tolist() for s in self.spans]  # collective over TP
        if trainer.ctx.is_main:
            plot_spans(spans, self.max_span, trainer.run_dir / "spans.png")
            if self.start is not None:
                print(span_summary(self.start[1], spans, trainer.step - self.start[0],
                                   self.max_span, self.lr), flush=True)


def span_summary(before: list[list[float]], after: list[list[float]], steps: int,
                 max_span: int, lr: float) -> str:
    """One line: how the heads' spans moved over ``steps`` steps (mean and largest, start
    -> end), and how long they take to grow. Adam moves each span fraction by about the
    learning rate per step at most, so a span grows by at most ``lr x S`` positions a step."""
    def stats(spans):
        flat = [z for layer in spans for z in layer]
        return sum(flat) / len(flat), max(flat)

    (mean0, max0), (mean1, max1) = stats(before), stats(after)
    line = (f"adaptive span over {steps} steps: mean span {mean0:.2f} -> {mean1:.2f}, largest "
            f"{max0:.2f} -> {max1:.2f} positions (of model.attn_span={max_span}; spans.png)")
    per_step = lr * max_span  # Adam's largest move of z = S x fraction
    quarter = math.ceil(max_span / 4 / per_step) if per_step > 0 else None
    rate = (mean1 - mean0) / steps if steps else 0.0
    if rate > 0:
        eta = math.ceil(max(max_span / 4 - mean1, 0) / rate)
        line += (f"; at this run's {rate:.3g} positions/step the mean reaches S/4 = "
                 f"{max_span / 4:g} in ~{eta} more steps")
    else:
        line += "; the spans did not grow: they grow only where a longer context pays " \
            "for the L1 penalty (model.adaptive_span_loss)"
    if quarter is not None:
        line += (f"; a span moves at most ~optim.lr x S = {per_step:.3g} positions a step, so "
                 f"reaching S/4 takes >= {quarter} steps (or start higher: "
                 "model.adaptive_span_init)")
    return line


def plot_spans(spans: list[list[float]], max_span: int, out: Path) -> Path:
    """Every head's learned span, by layer (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for layer, heads in enumerate(spans):
        ax.scatter([layer] * len(heads), heads, s=18, alpha=0.7, color="tab:blue")
        ax.plot([layer - 0.3, layer + 0.3], [sum(heads) / len(heads)] * 2, color="tab:red")
    ax.set_xlabel("layer (attention sublayer, bottom to top)")
    ax.set_ylabel("span z (positions)")
    ax.set_ylim(0, max_span * 1.02)
    ax.set_title("learned attention spans per head (red: layer mean)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
