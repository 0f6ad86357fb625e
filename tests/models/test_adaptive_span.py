"""Adaptive attention span: the mask, its gradient, the clamp, trimming that changes
nothing, TP, and the configs it refuses."""


import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.models import build_model
from megatron_lite.models.adaptive_span import AdaptiveSpan, span_mask, span_modules
from megatron_lite.models.relative import Memory
from megatron_lite.resolve import check_config
from tests.distributed import gather_full, max_dev
from tests.models.test_models_tp import VOCAB, tiny_cfg


def span_cfg(**kw):
    base = dict(position_embedding="relative", adaptive_span=True, attn_span=256,
                mem_len=256, adaptive_span_ramp=8, num_layers=2, seq_length=16,
                max_position_embeddings=16)
    base.update(kw)
    return tiny_cfg("gpt", **base)


def test_mask_values_at_chosen_distances():
    x = torch.tensor([0.0, 5.0, 10.0, 12.0, 14.0, 20.0, -3.0])
    got = span_mask(x, torch.tensor(10.0), ramp=4)
    # (R + z - x) / R clamped: 14/4, 9/4, 4/4, 2/4, 0, -6/4, 17/4
    assert torch.equal(got, torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0]))


def _set_spans(model, fractions):
    for span, f in zip(span_modules(model), fractions, strict=True):
        with torch.no_grad():
            span.fraction.copy_(torch.as_tensor(f))


def _two_segments(model, trim: bool):
    mem = Memory(256)
    ids = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(3))
    if not trim:
        AdaptiveSpan.keep, saved = (lambda self, mlen: mlen), AdaptiveSpan.keep
    try:
        with torch.no_grad():
            for start in range(0, 272, 16):  # fill the memory with 256 positions
                model(ids[:, start:start + 16], memory=mem)
        model.zero_grad(set_to_none=True)
        loss = model(ids[:, 272:288], ids[:, 273:289], memory=mem)
        loss.backward()
    finally:
        if not trim:
            AdaptiveSpan.keep = saved
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_trimming_changes_nothing_and_the_gradient_reaches_z():
    torch.manual_seed(0)
    model = build_model(span_cfg()).train()
    _set_spans(model, [[0.02, 0.05, 0.03, 0.01], [0.1, 0.04, 0.02, 0.06]])  # z <= 25.6
    assert span_modules(model)[0].keep(256) == 64  # 192 positions trimmed, in chunks of 64
    loss_trim, grads_trim = _two_segments(model, trim=True)
    loss_full, grads_full = _two_segments(model, trim=False)
    assert abs(loss_trim.item() - loss_full.item()) <= 1e-6
    for name, g in grads_full.items():
        assert max_dev(grads_trim[name], g) <= 1e-6, name
    z_grad = grads_trim["transformer.layers.0.attn.adaptive.fraction"]
    assert (z_grad != 0).all()  # every head's span is learned through the mask


def test_spans_stay_in_range_and_the_penalty_is_not_in_the_loss():
    span = build_model(span_cfg()).transformer.layers[0].attn.adaptive
    with torch.no_grad():
        span.fraction.copy_(torch.tensor([-0.5, 0.5, 1.5, 1.0]))
    assert torch.equal(span.z(), torch.tensor([0.0, 128.0, 256.0, 256.0]))  # acts clamped
    span.clamp_()
    assert torch.equal(span.fraction, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    assert span.penalty().item() == 640.0


def _check_tp(ctx):
    cfg = span_cfg()
    fractions = [[0.02, 0.5, 0.03, 0.01], [0.1, 0.04, 0.02, 0.3]]  # rank 1 reaches further
    ctx.seed(0)
    model = build_model(cfg, ctx).train()
    torch.manual_seed(0)
    dense = build_model(cfg).train()
    n = 4 // ctx.tp_size
    _set_spans(model, [f[ctx.tp_rank * n:(ctx.tp_rank + 1) * n] for f in fractions])
    _set_spans(dense, fractions)
    (loss, grads), (loss_ref, grads_ref) = _two_segments(model, True), _two_segments(dense, True)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    params = dict(model.named_parameters())
    for name, g in grads.items():
        p = params[name]
        if getattr(p, "tp_dim", None) is not None:
            g = gather_full(g, ctx.tp_group, p.tp_dim, p.tp_stride)
        rows = min(g.shape[0], grads_ref[name].shape[0])
        assert max_dev(g[:rows], grads_ref[name][:rows]) <= 1e-5, name


@pytest.mark.parametrize("tp", [1, 2])
def test_heads_of_different_spans_at_tp(distributed, tp):
    distributed(_check_tp, tp)


@pytest.mark.parametrize("overrides,message", [
    (["model.adaptive_span=true", "model.attn_span=64"], "needs model.position_embedding"),
    (["model.position_embedding=relative", "model.adaptive_span=true",
      "model.attn_span=32"], "adaptive_span_ramp=32 must be in (0, model.attn_span=32)"),
    (["model.position_embedding=relative", "model.adaptive_span=true", "model.attn_span=64",
      "model.mem_len=32"], "the memory must hold the largest span"),
    (["model.arch=bert", "model.position_embedding=relative", "model.adaptive_span=true",
      "model.attn_span=64"], "GPT only"),
    (["model.position_embedding=relative", "model.adaptive_span=true"], "attn_span > 0"),
])
def test_bad_configs(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, overrides))
    assert message in str(err.value)


def test_generation_through_the_trimmed_memory_equals_recomputing():
    from megatron_lite.generate import generate
    from megatron_lite.parallel import ParallelContext

    torch.manual_seed(0)
    model = build_model(span_cfg(attn_span=160, mem_len=160, init_std=0.5))
    _set_spans(model, [[0.02, 0.05, 0.03, 0.01], [0.1, 0.04, 0.02, 0.06]])
    prompt = torch.randint(0, VOCAB, (140,)).tolist()  # the memory path trims 64 positions
    ours = generate(model, ParallelContext(), prompt, 12, greedy=True)
    ref = generate(model, ParallelContext(), prompt, 12, greedy=True, use_cache=False)
    assert ours == ref


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = build_model(span_cfg(activation_checkpointing=mode)).train()
        _set_spans(model, [[0.02, 0.05, 0.03, 0.01], [0.1, 0.04, 0.02, 0.06]])
        grads.append(_two_segments(model, trim=True)[1])
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert max_dev(g, other[name]) <= 1e-6, name
