"""The collectives against what each rank holds, and a ``None`` group as a group of one."""

import torch

from megatron_lite.parallel.comm import MAX, all_gather, all_gather_list, all_reduce


def test_none_group_is_a_group_of_one():
    x = torch.arange(6.0).view(2, 3)
    assert all_reduce(x, None) is x and torch.equal(x, torch.arange(6.0).view(2, 3))
    assert all_gather(x, None, dim=0) is x
    assert all_gather_list(x, None) == [x]


def _check(ctx):
    n, r = ctx.tp_size, ctx.tp_rank
    x = torch.arange(4.0).view(2, 2) + 10 * r  # rank r holds base + 10 r
    base = torch.arange(4.0).view(2, 2)
    total = all_reduce(x.clone(), ctx.tp_group)
    assert torch.equal(total, n * base + 10 * sum(range(n)))
    assert torch.equal(all_reduce(x.clone(), ctx.tp_group, MAX), base + 10 * (n - 1))
    want = [base + 10 * k for k in range(n)]
    assert all(torch.equal(a, b) for a, b in zip(all_gather_list(x, ctx.tp_group), want,
                                                 strict=True))
    assert torch.equal(all_gather(x, ctx.tp_group, dim=1), torch.cat(want, dim=1))
    assert torch.equal(all_gather(x, ctx.tp_group, dim=0), torch.cat(want, dim=0))


def test_collectives_on_3_processes(distributed):
    distributed(_check, 3)


def _inplace(ctx):
    import pytest

    from megatron_lite.parallel.mappings import copy_to_tp_region, reduce_from_tp_region

    r, g = ctx.tp_rank, ctx.tp_group
    # reduce_from overwrites its input (no copy) and returns it
    x = torch.full((2, 3), float(r + 1), requires_grad=True)
    partial = x * 2.0  # MulBackward saves x and the scalar, not its output
    out = reduce_from_tp_region(partial, g)
    assert out.data_ptr() == partial.data_ptr() and torch.equal(out, torch.full((2, 3), 6.0))
    out.sum().backward()
    assert torch.equal(x.grad, torch.full((2, 3), 2.0))  # identity backward, through x * 2
    # copy_to's backward sums the (fresh) gradient of the linear that follows it
    w = torch.full((4, 3), float(r + 1))
    y = torch.ones(2, 3, requires_grad=True)
    torch.nn.functional.linear(copy_to_tp_region(y, g), w).sum().backward()
    assert torch.equal(y.grad, torch.full((2, 3), 4.0 * (1 + 2)))
    # a tensor its producer saved for backward: in place is caught, never silently wrong
    z = torch.full((2, 3), 0.5, requires_grad=True)
    saved = torch.tanh(z)  # TanhBackward saves its output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        reduce_from_tp_region(saved, g).sum().backward()


def test_tp_all_reduces_are_in_place_and_autograd_guards_them(distributed):
    distributed(_inplace, 2)
