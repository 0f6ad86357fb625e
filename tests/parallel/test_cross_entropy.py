"""Vocab-parallel cross-entropy against F.cross_entropy on the gathered logits."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.parallel import shard_tensor, vocab_parallel_argmax, vocab_parallel_cross_entropy
from tests.distributed import gather_full, max_dev

TOL = 1e-6
PADDED, REAL = 64, 50  # a vocab of 50 padded to 64 (divisible by TP 1, 2, 4)


def _check(ctx, mask_padding: bool, offset: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, PADDED) * 3 + offset  # large offset: tests stability
    target = torch.randint(0, REAL, (3, 7))
    target[0, :3] = -100  # ignored positions
    target[1, 0], target[1, 1] = 0, REAL - 1  # vocab edges
    target[2, 0] = PADDED // 2  # first id of rank 1's range at TP=2

    local = shard_tensor(logits, -1, ctx.tp_rank, ctx.tp_size).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, ctx.tp_group, ignore_index=-100,
                                        vocab_size=REAL if mask_padding else None)
    loss.backward()

    ref_logits = logits.detach().clone().requires_grad_()
    used = ref_logits[..., :REAL] if mask_padding else ref_logits
    ref = F.cross_entropy(used.reshape(-1, used.shape[-1]), target.reshape(-1), ignore_index=-100)
    ref.backward()

    d_loss = abs(loss.item() - ref.item())
    d_grad = max_dev(gather_full(local.grad, ctx.tp_group, -1), ref_logits.grad)
    assert d_loss <= TOL, f"loss deviates by {d_loss:.2e}"
    assert d_grad <= TOL, f"grad deviates by {d_grad:.2e}"
    assert local.grad[0, :3].abs().max() == 0, "ignored positions must get no gradient"

    # per-token losses under a non-uniform upstream gradient
    weights = torch.rand(3, 7)
    local.grad = None
    per_token = vocab_parallel_cross_entropy(local, target, ctx.tp_group, reduction="none",
                                             vocab_size=REAL if mask_padding else None)
    (per_token * weights).sum().backward()
    ref_logits.grad = None
    ref_tok = F.cross_entropy(used.reshape(-1, used.shape[-1]), target.reshape(-1),
                              reduction="none").view(3, 7)
    (ref_tok * weights).sum().backward()
    assert max_dev(per_token, ref_tok) <= TOL
    assert max_dev(gather_full(local.grad, ctx.tp_group, -1), ref_logits.grad) <= TOL
    if ctx.rank == 0:
        print(f"TP={ctx.tp_size} CE(mask={mask_padding}, offset={offset}): "
              f"loss={d_loss:.2e} grad={d_grad:.2e}")


def _check_all(ctx):
    for mask_padding in (False, True):
        for offset in (0.0, 1e4):
            _check(ctx, mask_padding, offset)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_f_cross_entropy(distributed, tp):
    distributed(_check_all, tp)


def test_reductions_and_all_ignored():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, requires_grad=True)
    target = torch.tensor([1, -100, 3, 9])
    per_token = vocab_parallel_cross_entropy(logits, target, reduction="none")
    ref = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(per_token, ref, atol=TOL, rtol=0)
    summed = vocab_parallel_cross_entropy(logits, target, reduction="sum")
    assert abs(summed.item() - ref.sum().item()) <= 1e-5
    nothing = vocab_parallel_cross_entropy(logits, torch.full((4,), -100))
    assert nothing.item() == 0.0  # F.cross_entropy gives nan here; a masked batch adds nothing
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_cross_entropy(logits, target[:3])


def test_second_backward_through_the_same_graph_is_refused():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def test_bf16_logits_give_fp32_loss_and_bf16_grad():
    torch.manual_seed(0)
    logits = torch.randn(6, 32).bfloat16().requires_grad_()
    target = torch.randint(0, 32, (6,))
    loss = vocab_parallel_cross_entropy(logits, target)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float(), target)
    assert abs(loss.item() - ref.item()) <= TOL


def _check_argmax(ctx):
    torch.manual_seed(1)
    logits = torch.randn(5, 9, PADDED)
    logits[0, 0, REAL + 3] = 100.0  # a padding id is the largest: it must not win
    logits[1, 0, :] = 0.0  # all tied: the lowest id
    logits[2, 0, [7, PADDED // 2 + 1]] = 50.0  # tied across TP ranks at TP=2: the lower id
    logits[3, 0, REAL - 1] = 60.0  # the last real id
    local = shard_tensor(logits, -1, ctx.tp_rank, ctx.tp_size)
    got = vocab_parallel_argmax(local, ctx.tp_group, vocab_size=REAL)
    assert torch.equal(got, logits[..., :REAL].argmax(-1))
    assert got[0, 0] < REAL and got[1, 0] == 0 and got[2, 0] == 7 and got[3, 0] == REAL - 1
    assert torch.equal(vocab_parallel_argmax(local, ctx.tp_group), logits.argmax(-1))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_argmax_matches_torch_argmax_of_the_gathered_logits(distributed, tp):
    distributed(_check_argmax, tp)
