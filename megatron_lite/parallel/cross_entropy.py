"""Cross-entropy over logits whose vocab dimension is split across the TP group.

The full ``[tokens, vocab]`` logits never exist on one rank. Three all-reduces of
``[tokens]``-sized tensors replace the gather: the max (for stability), the target
logit (owned by exactly one rank) and the sum of exponentials.
"""

from __future__ import annotations

import torch

from megatron_lite.parallel.comm import MAX, all_gather_list, all_reduce
from megatron_lite.parallel.state import group_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    # NOTE: written for few passes over the [tokens, vocab/tp] logits (the largest
    # activation of a small model): max, subtract, exp, sum forward; one in-place
    # multiply backward. The saved exponentials are overwritten in backward, so this
    # function does not support backward through the same graph twice.

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, vocab_size):
        # logits: [n, v/tp] (this rank's vocab slice), target: [n] global ids
        n_local = logits.shape[-1]
        start = group_rank(group) * n_local
        # columns >= vocab_size are padding and never a valid prediction
        valid = n_local if vocab_size is None else min(max(vocab_size - start, 0), n_local)

        if valid > 0:
            local_max = logits[:, :valid].max(dim=-1).values.float()
        else:  # this rank holds only padding
            local_max = logits.new_full((logits.shape[0],), float("-inf"), dtype=torch.float32)
        logits_max = all_reduce(local_max, group, MAX)
        exp = logits.float() - logits_max.unsqueeze(-1)  # [n, v/tp], new fp32 tensor

        ignored = target == ignore_index
        local_target = target - start
        mine = (local_target >= 0) & (local_target < valid) & ~ignored
        local_target = local_target.masked_fill(~mine, 0)
        rows = torch.arange(exp.shape[0], device=exp.device)
        target_logit = all_reduce(exp[rows, local_target].masked_fill(~mine, 0.0), group)

        exp.exp_()
        exp[:, valid:] = 0.0
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp, sum_exp, local_target, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("vocab_parallel_cross_entropy: backward twice through the same "
                               "graph is not supported (its buffer is reused in place)")
        ctx.consumed = True
        exp, sum_exp, local_target, mine, ignored = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target), softmax = exp / sum_exp
        scale = grad_loss.masked_fill(ignored, 0.0) / sum_exp  # [n]
        grad = exp.mul_(scale.unsqueeze(-1))  # in place: the saved buffer becomes the grad
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= (grad_loss * mine).to(grad.dtype)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    *,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of vocab-sharded logits, computed in fp32.

    Args:
        logits: ``[..., vocab/tp]``, this rank's contiguous slice of the (padded) vocab.
        target: ``[...]`` global token ids, or ``ignore_index``.
        tp_group: the TP process group (``None`` = unsharded logits).
        ignore_index: targets with this value add no loss and no gradient.
        vocab_size: the true vocab size; logits of padded ids ``>= vocab_size`` are
            excluded from the softmax, so the loss does not depend on the padding
            (which changes with the TP size). ``None`` keeps them, as Megatron does.
        reduction: ``"mean"`` over non-ignored targets (0 when there are none),
            ``"sum"``, or ``"none"`` (per-token, shaped like ``target``).
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)}")
    per_token = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), tp_group, ignore_index,
        vocab_size,
    ).view(target.shape)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        count = (target != ignore_index).sum().clamp(min=1)
        return per_token.sum() / count
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, group, vocab_size: int | None = None
                          ) -> torch.Tensor:
    """The id of the largest logit over the full vocab, from ``[..., V/tp]`` slices, without
    gathering them: each rank's best (value, id) pair is all-gathered (``[..., 2]`` per
    rank). Padding ids (>= ``vocab_size``) never win; ties go to the lowest id, as in
    ``torch.argmax`` of the gathered logits."""
    n_local = logits.shape[-1]
    start = group_rank(group) * n_local
    valid = n_local if vocab_size is None else min(max(vocab_size - start, 0), n_local)
    local = logits.detach().double()
    if valid < n_local:
        local[..., valid:] = float("-inf")
    value, index = local.max(dim=-1)
    pairs = torch.stack(all_gather_list(torch.stack([value, (index + start).double()], -1),
                                        group))  # [tp, ..., 2]
    best = pairs[..., 0].argmax(dim=0, keepdim=True)  # first maximum: the lowest rank
    return pairs[..., 1].gather(0, best).squeeze(0).long()
