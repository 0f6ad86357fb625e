"""The chunked output layer + vocab-parallel cross-entropy against F.linear + F.cross_entropy
of the dense layer (one process), and against the unchunked layer, at TP 1, 2, 4."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.models import build_model
from megatron_lite.parallel import (
    linear_cross_entropy,
    shard_tensor,
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)
from megatron_lite.parallel.mappings import copy_to_tp_region
from tests.distributed import gather_full, max_dev
from tests.models.test_models_tp import VOCAB, make_batch, tiny_cfg

TOL = 1e-6
PADDED, REAL, H = 64, 50, 16  # a vocab of 50 padded to 64 (divisible by TP 1, 2, 4)


def _inputs(offset: float):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, H, generator=g)
    weight = torch.randn(PADDED, H, generator=g) * 0.5
    bias = torch.randn(PADDED, generator=g) + offset  # large offset: tests stability
    target = torch.randint(0, REAL, (3, 7), generator=g)
    target[0, :3] = -100  # ignored positions
    target[1, 0], target[1, 1] = 0, REAL - 1  # vocab edges
    target[2, 0] = PADDED // 2  # first id of rank 1's range at TP=2
    return hidden, weight, bias, target


def _dense(hidden, weight, bias, target, mask_padding: bool, reduction: str = "mean"):
    """F.linear + F.cross_entropy of the whole layer, with the gradients."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    logits = F.linear(h, w, b)
    used = logits[..., :REAL] if mask_padding else logits
    loss = F.cross_entropy(used.reshape(-1, used.shape[-1]), target.reshape(-1),
                           reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad, logits.detach()


def _check(ctx, mask_padding: bool, with_bias: bool, offset: float, chunk: int,
           reduction: str) -> None:
    hidden, weight, bias, target = _inputs(offset)
    bias = bias if with_bias else None
    vocab = REAL if mask_padding else None
    ref_loss, ref_h, ref_w, ref_b, ref_logits = _dense(hidden, weight, bias, target,
                                                       mask_padding, reduction)
    h = hidden.clone().requires_grad_()
    w = shard_tensor(weight, 0, ctx.tp_rank, ctx.tp_size).requires_grad_()
    b = None if bias is None else shard_tensor(bias, 0, ctx.tp_rank, ctx.tp_size).requires_grad_()
    loss, pred = linear_cross_entropy(h, w, target, ctx.tp_group, bias=b, vocab_size=vocab,
                                      reduction=reduction, chunk_tokens=chunk,
                                      predictions=True)
    loss.backward()
    what = f"TP={ctx.tp_size} chunk={chunk} {reduction} mask={mask_padding} bias={with_bias}"
    scale = max(1.0, ref_loss.abs().item())  # a sum of 18 losses: relative 1e-6
    assert abs(loss.item() - ref_loss.item()) <= TOL * scale, what
    assert max_dev(h.grad, ref_h) <= TOL, what
    assert max_dev(gather_full(w.grad, ctx.tp_group, 0), ref_w) <= TOL, what
    if b is not None:
        assert max_dev(gather_full(b.grad, ctx.tp_group, 0), ref_b) <= TOL, what
    used = ref_logits[..., :REAL] if mask_padding else ref_logits
    assert torch.equal(pred, used.argmax(-1)), what
    assert h.grad[0, :3].abs().max() == 0, "ignored positions must get no gradient"


def _check_all(ctx):
    for chunk in (1, 5, 0, 1000):  # one token, uneven chunks, unchunked, one chunk
        _check(ctx, True, True, 0.0, chunk, "mean")
    _check(ctx, False, False, 0.0, 4, "sum")
    _check(ctx, True, True, 1e4, 4, "mean")
    _check(ctx, True, False, 0.0, 4, "sum")
    # no gradient wanted (evaluation): per-token losses, chunked
    hidden, weight, bias, target = _inputs(0.0)
    w = shard_tensor(weight, 0, ctx.tp_rank, ctx.tp_size)
    b = shard_tensor(bias, 0, ctx.tp_rank, ctx.tp_size)
    with torch.no_grad():
        per_token = linear_cross_entropy(hidden, w, target, ctx.tp_group, bias=b,
                                         vocab_size=REAL, reduction="none", chunk_tokens=4)
    ref = F.cross_entropy(F.linear(hidden, weight, bias)[..., :REAL].reshape(-1, REAL),
                          target.reshape(-1), reduction="none").view(3, 7)
    assert max_dev(per_token, ref) <= TOL
    # a gradient of per-token losses falls back to the unchunked layer (still exact)
    h = hidden.clone().requires_grad_()
    weights = torch.rand(3, 7, generator=torch.Generator().manual_seed(3))
    (linear_cross_entropy(h, w, target, ctx.tp_group, bias=b, vocab_size=REAL,
                          reduction="none", chunk_tokens=4) * weights).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    (F.cross_entropy(F.linear(h_ref, weight, bias)[..., :REAL].reshape(-1, REAL),
                     target.reshape(-1), reduction="none").view(3, 7) * weights).sum().backward()
    assert max_dev(h.grad, h_ref.grad) <= TOL


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_chunked_matches_dense_f_cross_entropy(distributed, tp):
    distributed(_check_all, tp)


def _models_chunked_vs_unchunked(ctx):
    """GPT and BERT at this TP size, chunked (5 tokens) vs unchunked: same loss, same grads."""
    for arch in ("gpt", "bert"):
        batch = make_batch(arch)
        out = {}
        for chunk in (0, 5):
            ctx.seed(0)
            model = build_model(tiny_cfg(arch, loss_chunk_tokens=chunk), ctx)
            loss = model(**batch)
            loss.backward()
            stats = model.last_stats if arch == "bert" else None
            out[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in
                                          model.named_parameters()}, stats)
        (l0, g0, s0), (l5, g5, s5) = out[0], out[5]
        assert abs(l0.item() - l5.item()) <= TOL, arch
        for name in g0:
            assert max_dev(g0[name], g5[name]) <= TOL, (arch, name)
        if arch == "bert":
            assert max_dev(s0, s5) <= TOL  # the losses and accuracies it logs


@pytest.mark.parametrize("tp", [2, 4])
def test_models_chunked_equal_unchunked(distributed, tp):
    distributed(_models_chunked_vs_unchunked, tp)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_models_loss_is_f_cross_entropy_of_their_logits(arch):
    """The dense model's chunked loss (3-token chunks) and its gradients equal
    F.cross_entropy of the logits it returns without labels."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch, loss_chunk_tokens=3))
    batch = make_batch(arch)
    loss = model(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if "labels" not in k}
    if arch == "gpt":
        logits = model(**inputs)[..., :VOCAB]
        ref = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    else:
        mlm, nsp = model(**inputs)
        ref = F.cross_entropy(mlm[..., :VOCAB].reshape(-1, VOCAB),
                              batch["mlm_labels"].reshape(-1)) + \
            F.cross_entropy(nsp, batch["nsp_labels"])
        picked = batch["mlm_labels"] != -100
        accuracy = (mlm[..., :VOCAB].argmax(-1)[picked] == batch["mlm_labels"][picked])
        assert model.last_stats[2].item() == accuracy.sum().item()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= TOL
    for n, p in model.named_parameters():
        assert max_dev(grads[n], p.grad) <= TOL, n


def test_eval_sum_is_per_token_sum():
    """``reduction="sum"`` (evaluation, wikitext) without a gradient: chunked in forward only."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("gpt", loss_chunk_tokens=4)).eval()
    batch = make_batch("gpt")
    with torch.no_grad():
        total = model(batch["input_ids"], batch["labels"], reduction="sum")
        logits = model(batch["input_ids"])[..., :VOCAB]
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1),
                          reduction="sum")
    assert abs(total.item() - ref.item()) <= TOL * ref.item()


def test_autocast_bf16_matches_unchunked():
    """Under bf16 autocast the chunks multiply in bf16 as F.linear would."""
    hidden, weight, bias, target = _inputs(0.0)
    out = []
    for chunk in (0, 4):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, target, vocab_size=REAL, chunk_tokens=chunk)
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == torch.float32
        out.append((loss.detach(), h.grad, w.grad))
    (l0, h0, w0), (l4, h4, w4) = out
    assert abs(l0.item() - l4.item()) <= 1e-2
    assert max_dev(h0, h4) <= 1e-2 * h0.abs().max().item()
    assert max_dev(w0, w4) <= 1e-2 * w0.abs().max().item()


def test_unchunked_path_is_the_old_layer():
    """chunk_tokens=0 is F.linear + vocab_parallel_cross_entropy (and its argmax)."""
    hidden, weight, bias, target = _inputs(0.0)
    loss, pred = linear_cross_entropy(hidden, weight, target, vocab_size=REAL, chunk_tokens=0,
                                      predictions=True)
    logits = F.linear(copy_to_tp_region(hidden, None), weight)
    assert torch.equal(loss, vocab_parallel_cross_entropy(logits, target, vocab_size=REAL))
    assert torch.equal(pred, vocab_parallel_argmax(logits, None, REAL))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, target, reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        linear_cross_entropy(hidden, weight, target[:2])
