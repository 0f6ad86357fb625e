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
