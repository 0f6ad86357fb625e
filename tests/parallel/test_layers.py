"""Each parallel layer against a dense single-process reference with the same full weights."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    shard_tensor,
)
from tests.distributed import gather_full, max_dev

TOL = 1e-5
B, S, H_IN, H_OUT = 2, 5, 16, 24  # H_OUT splits into 4 ranks x 3 fused blocks


def _full_weight(seed: int, shape, std: float = 0.02) -> torch.Tensor:
    """The weight a layer must hold in total: drawn from the same seed by a plain init."""
    torch.manual_seed(seed)
    return torch.nn.init.normal_(torch.empty(shape), mean=0.0, std=std)


def _report(ctx, name: str, **devs: float) -> None:
    for key, value in devs.items():
        assert value <= TOL, f"TP={ctx.tp_size} {name}: {key} deviates by {value:.3e}"
    if ctx.rank == 0:
        print(f"TP={ctx.tp_size} {name}: " + " ".join(f"{k}={v:.2e}" for k, v in devs.items()))


def _check_column(ctx, stride: int, gather_output: bool) -> None:
    w_full = _full_weight(0, (H_OUT, H_IN), std=0.5)
    torch.manual_seed(0)
    layer = ColumnParallelLinear(H_IN, H_OUT, init_method=normal_init(0.5), stride=stride,
                                 gather_output=gather_output, tp_group=ctx.tp_group)
    w_got = gather_full(layer.weight, ctx.tp_group, 0, stride)
    assert torch.equal(w_got, w_full), "sharded init is not bit-identical to the full draw"

    torch.manual_seed(1)
    b_full, x, g = torch.randn(H_OUT), torch.randn(B, S, H_IN), torch.randn(B, S, H_OUT)
    with torch.no_grad():
        layer.bias.copy_(shard_tensor(b_full, 0, ctx.tp_rank, ctx.tp_size, stride))

    x_tp = x.clone().requires_grad_()
    y = layer(x_tp)
    if gather_output:
        y_full = y.detach()
        (y * g).sum().backward()
    else:
        y_full = gather_full(y, ctx.tp_group, -1, stride)
        (y * shard_tensor(g, -1, ctx.tp_rank, ctx.tp_size, stride)).sum().backward()

    w_ref, b_ref, x_ref = (t.clone().requires_grad_() for t in (w_full, b_full, x))
    y_ref = F.linear(x_ref, w_ref, b_ref)
    (y_ref * g).sum().backward()

    _report(ctx, f"column(stride={stride}, gather={gather_output})",
            out=max_dev(y_full, y_ref),
            dx=max_dev(x_tp.grad, x_ref.grad),
            dw=max_dev(gather_full(layer.weight.grad, ctx.tp_group, 0, stride), w_ref.grad),
            db=max_dev(gather_full(layer.bias.grad, ctx.tp_group, 0, stride), b_ref.grad))


def _check_row(ctx, input_is_parallel: bool) -> None:
    w_full = _full_weight(0, (H_OUT, H_IN), std=0.5)
    torch.manual_seed(0)
    layer = RowParallelLinear(H_IN, H_OUT, init_method=normal_init(0.5),
                              input_is_parallel=input_is_parallel, tp_group=ctx.tp_group)
    assert torch.equal(gather_full(layer.weight, ctx.tp_group, 1), w_full)

    torch.manual_seed(1)
    b_full, x, g = torch.randn(H_OUT), torch.randn(B, S, H_IN), torch.randn(B, S, H_OUT)
    with torch.no_grad():
        layer.bias.copy_(b_full)  # replicated

    x_in = shard_tensor(x, -1, ctx.tp_rank, ctx.tp_size) if input_is_parallel else x
    x_tp = x_in.clone().requires_grad_()
    y = layer(x_tp)
    (y * g).sum().backward()

    w_ref, b_ref, x_ref = (t.clone().requires_grad_() for t in (w_full, b_full, x))
    y_ref = F.linear(x_ref, w_ref, b_ref)
    (y_ref * g).sum().backward()
    dx_ref = x_ref.grad
    if input_is_parallel:
        dx_ref = shard_tensor(dx_ref, -1, ctx.tp_rank, ctx.tp_size)

    _report(ctx, f"row(input_is_parallel={input_is_parallel})",
            out=max_dev(y, y_ref),
            dx=max_dev(x_tp.grad, dx_ref),
            dw=max_dev(gather_full(layer.weight.grad, ctx.tp_group, 1), w_ref.grad),
            db=max_dev(layer.bias.grad, b_ref.grad))


def _check_embedding(ctx) -> None:
    vocab, dim = 64, 8
    w_full = _full_weight(0, (vocab, dim), std=1.0)
    torch.manual_seed(0)
    layer = VocabParallelEmbedding(vocab, dim, init_method=normal_init(1.0), tp_group=ctx.tp_group)
    assert torch.equal(gather_full(layer.weight, ctx.tp_group, 0), w_full)
    assert (layer.vocab_start, layer.vocab_end) == (
        ctx.tp_rank * vocab // ctx.tp_size, (ctx.tp_rank + 1) * vocab // ctx.tp_size)

    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (B, S))
    ids[0, :4] = torch.tensor([0, vocab - 1, vocab // 2, vocab // 2 - 1])  # range edges
    g = torch.randn(B, S, dim)
    y = layer(ids)
    (y * g).sum().backward()

    w_ref = w_full.clone().requires_grad_()
    y_ref = F.embedding(ids, w_ref)
    (y_ref * g).sum().backward()
    _report(ctx, "embedding", out=max_dev(y, y_ref),
            dw=max_dev(gather_full(layer.weight.grad, ctx.tp_group, 0), w_ref.grad))


def _check_layers(ctx, which: str) -> None:
    if which == "column":
        for stride, gather in ((1, False), (1, True), (3, False)):
            _check_column(ctx, stride, gather)
    elif which == "row":
        for input_is_parallel in (False, True):
            _check_row(ctx, input_is_parallel)
    else:
        _check_embedding(ctx)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("which", ["column", "row", "embedding"])
def test_layer_matches_dense(distributed, which, tp):
    distributed(_check_layers, tp, which)


def _check_whole_heads(ctx) -> None:
    heads, head_dim = 4, 3
    hidden = heads * head_dim
    torch.manual_seed(0)
    qkv = ColumnParallelLinear(hidden, 3 * hidden, stride=3, tp_group=ctx.tp_group)
    full = _full_weight(0, (3 * hidden, hidden))
    q, k, v = full.split(hidden)
    per_rank = heads // ctx.tp_size
    # rank r holds [Q heads | K heads | V heads] for heads r*per_rank ... (r+1)*per_rank-1
    local = qkv.weight.detach().view(3, per_rank, head_dim, hidden)
    for block, ref in enumerate((q, k, v)):
        for j in range(per_rank):
            head = ctx.tp_rank * per_rank + j
            assert torch.equal(local[block, j], ref[head * head_dim:(head + 1) * head_dim])


@pytest.mark.parametrize("tp", [2, 4])
def test_stride3_gives_whole_heads(distributed, tp):
    distributed(_check_whole_heads, tp)


def test_gather_output_with_stride_is_refused():
    with pytest.raises(ValueError, match="stride"):
        ColumnParallelLinear(4, 12, stride=3, gather_output=True)
