"""The output layer and the vocab-parallel cross-entropy in one pass over chunks of tokens.

``linear_cross_entropy(hidden, weight, target, group)`` is
``vocab_parallel_cross_entropy(F.linear(copy_to_tp_region(hidden), weight, bias), target)``
without the ``[tokens, V/tp]`` logits: for each chunk of ``chunk_tokens`` tokens the
forward computes the logits slice, the loss (two TP all-reduces of ``[chunk]``-sized
tensors: the max, then the target logit and the sum of exponentials together), and, when
a gradient will be wanted, the softmax minus the one-hot target, from which it takes the
gradient with respect to the chunk's hidden states and adds the chunk's share of the
weight's (and bias's) gradient into an accumulator. Only those gradients are kept for
backward (``[tokens, h]`` and ``[V/tp, h]``: nothing of size tokens x vocab), and backward
scales them by the incoming gradient of the summed loss (a scalar, so the trick is exact).
The gradient of ``hidden`` is completed over the TP group by ``copy_to_tp_region``'s
backward all-reduce, as in the unchunked layer.

This is the "fused linear cross-entropy" idea (as in Liger-Kernel, llm.c's fused
classifier); the vocab-parallel loss is Megatron's. Any model's head can use it: GPT's tied
output layer, BERT's MLM decoder (with its bias), an untied LM head.

Under autocast the chunk's matmuls run in the autocast dtype, as ``F.linear`` would, and
the softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.parallel.comm import MAX, all_gather_list, all_reduce
from megatron_lite.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from megatron_lite.parallel.mappings import copy_to_tp_region
from megatron_lite.parallel.state import group_rank

DEFAULT_CHUNK_TOKENS = 256  # model.loss_chunk_tokens (bench/train_step.py --table loss)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` would multiply in here (autocast's, if enabled)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    # NOTE: the saved gradients are scaled in place in backward, so this function does not
    # support backward through the same graph twice (neither does the unchunked one).

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, group, ignore_index, vocab_size, chunk,
                need_grad, want_pred):
        # hidden: [n, h], weight: [V/tp, h], bias: [V/tp] or None, target: [n] global ids
        n, n_local = hidden.shape[0], weight.shape[0]
        start = group_rank(group) * n_local
        # columns >= vocab_size are padding and never a valid prediction
        valid = n_local if vocab_size is None else min(max(vocab_size - start, 0), n_local)
        cdt = _compute_dtype(hidden, weight)
        dev = hidden.device
        with torch.autocast(dev.type, enabled=False):
            h_c, w_c = hidden.to(cdt), weight.to(cdt)
            b_c = None if bias is None else bias.to(cdt)
            losses = torch.empty(n, dtype=torch.float32, device=dev)
            pred = torch.empty(n, dtype=torch.long, device=dev) if want_pred else None
            grad_h = grad_w = grad_b = None
            if need_grad:
                grad_h = torch.empty_like(hidden)
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
                grad_b = None if bias is None else torch.zeros(n_local, dtype=torch.float32,
                                                               device=dev)
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                x, tgt = h_c[a:b], target[a:b]
                if b_c is None:
                    logits = x @ w_c.t()  # [c, V/tp]
                else:
                    logits = torch.addmm(b_c, x, w_c.t())
                logits = logits.float()  # (no copy in fp32)
                if valid < n_local:  # padding: exp() makes it 0, max() never picks it
                    logits[:, valid:] = float("-inf")
                if want_pred:  # (a rank of padding only: -inf, never the best)
                    local_max, local_arg = logits.max(dim=-1)
                else:
                    local_max = logits.amax(dim=-1)
                if want_pred:
                    pairs = torch.stack(all_gather_list(torch.stack(
                        [local_max.double(), (local_arg + start).double()], -1), group))
                    best = pairs[..., 0].argmax(dim=0, keepdim=True)  # ties: lowest rank
                    pred[a:b] = pairs[..., 1].gather(0, best).squeeze(0).long()
                logits_max = all_reduce(local_max.clone(), group, MAX)
                logits -= logits_max.unsqueeze(-1)
                ignored = tgt == ignore_index
                local_t = tgt - start
                mine = (local_t >= 0) & (local_t < valid) & ~ignored
                local_t = local_t.masked_fill(~mine, 0)
                rows = torch.arange(b - a, device=dev)
                both = torch.empty(2, b - a, dtype=torch.float32, device=dev)
                both[0] = logits[rows, local_t].masked_fill(~mine, 0.0)
                logits.exp_()
                torch.sum(logits, dim=-1, out=both[1])
                target_logit, sum_exp = all_reduce(both, group)
                losses[a:b] = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
                if not need_grad:
                    continue
                # d loss / d logits = softmax - onehot(target); 0 on ignored rows
                logits *= ((~ignored).float() / sum_exp).unsqueeze(-1)
                logits[rows, local_t] -= mine.float()
                g = logits.to(cdt)
                if cdt == grad_h.dtype:
                    torch.mm(g, w_c, out=grad_h[a:b])
                else:
                    grad_h[a:b] = g @ w_c
                if cdt == torch.float32:
                    grad_w.addmm_(g.t(), x)
                else:
                    grad_w += (g.t() @ x).float()
                if grad_b is not None:
                    grad_b += g.sum(dim=0).float()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.has_bias = bias is not None
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(losses)
        if pred is None:
            pred = torch.empty(0, dtype=torch.long, device=dev)
        ctx.mark_non_differentiable(pred)
        return losses.sum(), losses, pred

    @staticmethod
    def backward(ctx, grad_sum, _grad_losses, _grad_pred):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("linear_cross_entropy: backward twice through the same graph "
                               "is not supported (its buffers are reused in place)")
        ctx.consumed = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("linear_cross_entropy: no gradient was computed in forward")
        scale = grad_sum.float()
        grad_h = grad_h.mul_(scale.to(grad_h.dtype))
        grad_w = grad_w.mul_(scale).to(ctx.w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(scale).to(ctx.b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    reduction: str = "mean",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    predictions: bool = False,
    input_is_gathered: bool = False,
):
    """Cross-entropy of ``F.linear(hidden, weight, bias)``'s vocab-sharded logits, chunked.

    Args:
        hidden: ``[..., h]`` hidden states, replicated over the TP group.
        weight: ``[V/tp, h]``, this rank's contiguous slice of the (padded) output layer.
        target: ``[...]`` global token ids, or ``ignore_index``.
        tp_group: the TP process group (``None`` = unsharded).
        bias: ``[V/tp]`` or None.
        ignore_index, vocab_size, reduction: as :func:`vocab_parallel_cross_entropy`.
            ``reduction="none"`` with a gradient wanted falls back to the unchunked layer
            (a per-token gradient cannot be applied to the accumulated weight gradient).
        chunk_tokens: tokens per chunk (``model.loss_chunk_tokens``); 0 = unchunked.
        predictions: also return the argmax over the full vocab of each token's logits
            (``[...]``, as :func:`vocab_parallel_argmax`), computed from the same chunks.
        input_is_gathered: ``hidden`` comes from the sequence-parallel gather for the head
            (``gather_sequence_for_head``), whose backward already reduces its partial
            gradient over TP: no :func:`copy_to_tp_region` here.

    Returns:
        the loss, or ``(loss, predictions)``.
    """
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden "
                         f"{tuple(hidden.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if chunk_tokens <= 0 or (need_grad and reduction == "none"):
        x = hidden if input_is_gathered else copy_to_tp_region(hidden, tp_group)
        logits = F.linear(x, weight, bias)
        loss = vocab_parallel_cross_entropy(logits, target, tp_group,
                                            ignore_index=ignore_index, vocab_size=vocab_size,
                                            reduction=reduction)
        if not predictions:
            return loss
        return loss, vocab_parallel_argmax(logits, tp_group, vocab_size)
    x = hidden if input_is_gathered else copy_to_tp_region(hidden, tp_group)
    x = x.reshape(-1, hidden.shape[-1])
    total, per_token, pred = _LinearCrossEntropy.apply(
        x, weight, bias, target.reshape(-1), tp_group, ignore_index, vocab_size,
        chunk_tokens, need_grad, predictions)
    if reduction == "none":
        loss = per_token.view(target.shape)
    elif reduction == "sum":
        loss = total
    else:
        loss = total / (target != ignore_index).sum().clamp(min=1)
    return (loss, pred.view(target.shape)) if predictions else loss
