"""TP-aware RNG streams and the RNG-restoring activation checkpoint."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPRNGTracker,
    checkpoint,
)
from megatron_lite.parallel.random import hash_uniform
from tests.distributed import gather_shards


def _check_streams(ctx) -> None:
    ctx.seed(1234)
    outside = F.dropout(torch.ones(4096), p=0.5)
    with ctx.rng.fork():
        inside = F.dropout(torch.ones(4096), p=0.5)
    after = torch.rand(16)

    outs, ins = gather_shards(outside, ctx.tp_group), gather_shards(inside, ctx.tp_group)
    assert all(torch.equal(o, outs[0]) for o in outs), "replicated-region masks must match"
    assert not any(torch.equal(ins[0], i) for i in ins[1:]), "TP-region masks must differ"

    # the fork leaves the default stream exactly where it would have been without it
    torch.manual_seed(1234)
    F.dropout(torch.ones(4096), p=0.5)
    assert torch.equal(after, torch.rand(16))
    # the tracked stream advances: a second fork draws a new mask
    with ctx.rng.fork():
        assert not torch.equal(inside, F.dropout(torch.ones(4096), p=0.5))


def test_dropout_masks_across_tp_ranks(distributed):
    distributed(_check_streams, 2)


class _Block(torch.nn.Module):
    """Column -> dropout in the TP region -> row -> dropout in the replicated region."""

    def __init__(self, ctx, hidden=16):
        super().__init__()
        self.ctx = ctx
        self.fc1 = ColumnParallelLinear(hidden, 4 * hidden, tp_group=ctx.tp_group)
        self.fc2 = RowParallelLinear(4 * hidden, hidden, input_is_parallel=True,
                                     tp_group=ctx.tp_group)

    def core(self, x):
        h = F.gelu(self.fc1(x))
        with self.ctx.rng.fork():
            h = F.dropout(h, p=0.3)
        return F.dropout(self.fc2(h), p=0.3)

    def forward(self, x, use_checkpoint):
        if use_checkpoint:
            return checkpoint(self.core, self.ctx.rng, x)
        return self.core(x)


def _grads_after_two_steps(ctx, use_checkpoint: bool, input_requires_grad: bool):
    ctx.seed(7)
    block = _Block(ctx)
    x = torch.randn(3, 5, 16, requires_grad=input_requires_grad)
    for _ in range(2):  # two steps: the RNG state after the first must also be right
        block(x, use_checkpoint).pow(2).sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    if input_requires_grad:
        grads.append(x.grad.clone())
    return grads, torch.get_rng_state(), ctx.rng.get_states()


def _check_checkpoint(ctx) -> None:
    for input_requires_grad in (True, False):
        plain, rng_plain, tracked_plain = _grads_after_two_steps(ctx, False, input_requires_grad)
        ckpt, rng_ckpt, tracked_ckpt = _grads_after_two_steps(ctx, True, input_requires_grad)
        assert len(plain) == len(ckpt)
        for a, b in zip(plain, ckpt, strict=True):
            assert torch.equal(a, b), f"checkpointed grads differ by {(a - b).abs().max():.3e}"
        assert torch.equal(rng_plain, rng_ckpt), "default RNG state differs after backward"
        for name, state in tracked_plain.items():
            assert torch.equal(state, tracked_ckpt[name]), "tracked RNG state differs"


@pytest.mark.parametrize("tp", [1, 2])
def test_checkpoint_reproduces_dropout_exactly(distributed, tp):
    distributed(_check_checkpoint, tp)


def test_checkpoint_under_bf16_autocast_matches():
    tracker = TPRNGTracker()
    tracker.add(TPRNGTracker.TP_REGION, 3)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def fn(t):
        with tracker.fork():
            return F.dropout(lin(t), 0.5)

    results = []
    for use_ckpt in (False, True):
        tracker.set_states({TPRNGTracker.TP_REGION: torch.Generator().manual_seed(3).get_state()})
        lin.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint(fn, tracker, x) if use_ckpt else fn(x)
        y.float().sum().backward()
        results.append((y.detach(), lin.weight.grad.clone(), x.grad.clone()))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_tracker_rejects_duplicate_names():
    tracker = TPRNGTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)


def test_hash_uniform_is_uniform_and_uncorrelated():
    n = 1 << 16
    u = hash_uniform((n,), torch.tensor([123]), seed=5)
    assert u.dtype == torch.float32 and 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum().item()
    assert chi2 < 40, chi2  # 15 degrees of freedom: p < 1e-3 above ~37.7

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].abs().item()

    assert corr(u[:-1], u[1:]) < 0.02  # neighbouring elements
    assert corr(u, hash_uniform((n,), torch.tensor([124]), seed=5)) < 0.02  # next key
    assert corr(u, hash_uniform((n,), torch.tensor([123]), seed=6)) < 0.02  # another rank
    assert torch.equal(u, hash_uniform((n,), torch.tensor([123]), seed=5))  # a pure function
