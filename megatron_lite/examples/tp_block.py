"""A tensor-parallel transformer block against its dense twin.

    torchrun --nproc_per_node 2 -m megatron_lite.examples.tp_block

Builds one pre-LN transformer block (attention split by heads, column- then
row-parallel MLP) at TP = world size, a plain single-process PyTorch twin holding the
gathered full weights, and prints how closely outputs and gradients agree, and how
many all-reduces one forward and one backward cost.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    destroy_parallel,
    init_parallel,
    read_launch_env,
    scaled_normal_init,
)
from megatron_lite.parallel.state_dict import gather_like

TOL = 1e-5


class ParallelBlock(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, written with TP layers."""

    def __init__(self, hidden: int, heads: int, tp_group=None, num_layers: int = 1):
        super().__init__()
        self.head_dim = hidden // heads
        out_init = scaled_normal_init(0.02, num_layers)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = ColumnParallelLinear(hidden, 3 * hidden, stride=3, tp_group=tp_group)
        self.proj = RowParallelLinear(hidden, hidden, input_is_parallel=True,
                                      init_method=out_init, tp_group=tp_group)
        self.fc1 = ColumnParallelLinear(hidden, 4 * hidden, tp_group=tp_group)
        self.fc2 = RowParallelLinear(4 * hidden, hidden, input_is_parallel=True,
                                     init_method=out_init, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, s, 3, -1, self.head_dim)  # [b, s, 3, heads/tp, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads/tp, s, d]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads/tp, s, d]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, -1))  # [b, s, h]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))  # [b, s, h]


def dense_block(params: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """The same block in plain PyTorch (explicit softmax attention), from full weights."""
    b, s, h = x.shape
    d = h // heads

    def ln(t, name):
        return F.layer_norm(t, (h,), params[f"{name}.weight"], params[f"{name}.bias"])

    def lin(t, name):
        return t @ params[f"{name}.weight"].T + params[f"{name}.bias"]

    q, k, v = lin(ln(x, "ln1"), "qkv").split(h, dim=-1)  # each [b, s, h]
    q, k, v = (t.view(b, s, heads, d).transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [b, heads, s, s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    x = x + lin((probs @ v).transpose(1, 2).reshape(b, s, h), "proj")
    return x + lin(F.gelu(lin(ln(x, "ln2"), "fc1")), "fc2")


def full_tensors(block: nn.Module, tp_group, grads: bool = False) -> dict[str, torch.Tensor]:
    """Gather every parameter (or its gradient) of ``block`` into its full, unsharded form."""
    return {name: gather_like(p, p.grad if grads else p, tp_group)
            for name, p in block.named_parameters()}


@contextlib.contextmanager
def count_all_reduces():
    """Count ``dist.all_reduce`` calls made inside the block."""
    calls = [0]
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def compare(ctx: ParallelContext, hidden: int = 64, heads: int = 8, seq: int = 16,
            batch: int = 2) -> dict[str, float]:
    """Run the TP block and its dense twin on one input; return the largest deviations."""
    torch.manual_seed(0)
    block = ParallelBlock(hidden, heads, ctx.tp_group)
    params = {k: v.requires_grad_() for k, v in full_tensors(block, ctx.tp_group).items()}
    x = torch.randn(batch, seq, hidden)
    g = torch.randn(batch, seq, hidden)

    x_tp = x.clone().requires_grad_()
    with count_all_reduces() as fwd_calls:
        y = block(x_tp)
    with count_all_reduces() as bwd_calls:
        (y * g).sum().backward()

    x_ref = x.clone().requires_grad_()
    y_ref = dense_block(params, x_ref, heads)
    (y_ref * g).sum().backward()

    grads = full_tensors(block, ctx.tp_group, grads=True)
    return {
        "output": (y - y_ref).abs().max().item(),
        "input grad": (x_tp.grad - x_ref.grad).abs().max().item(),
        "weight grads": max((grads[k] - params[k].grad).abs().max().item() for k in params),
        "all-reduces fwd": fwd_calls[0],
        "all-reduces bwd": bwd_calls[0],
    }


def main() -> int:
    ctx = init_parallel(tensor_parallel_size=read_launch_env().world_size)
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // ctx.world_size))
        result = compare(ctx)
        if ctx.is_main:
            print(f"megatron-lite TP demo: {ctx.tp_size} ranks, one pre-LN transformer block "
                  "(hidden 64, 8 heads, seq 16), fp32")
            print(f"  each rank holds {8 // ctx.tp_size} of 8 heads and "
                  f"{4 * 64 // ctx.tp_size} of {4 * 64} MLP columns")
            for key in ("output", "input grad", "weight grads"):
                print(f"  max |TP - dense| {key:<13} {result[key]:.2e}")
            print(f"  all-reduces: {result['all-reduces fwd']} forward, "
                  f"{result['all-reduces bwd']} backward")
        ok = max(result[k] for k in ("output", "input grad", "weight grads")) <= TOL
        if ctx.is_main:
            print(("OK: TP block matches its dense twin within " if ok else "MISMATCH beyond ")
                  + f"{TOL:g}")
        return 0 if ok else 1
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
