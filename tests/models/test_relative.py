"""Transformer-XL: relative attention against a dense reference written from the paper's
formula, and the segment memory against one long forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.models import build_model
from megatron_lite.models.relative import Memory
from megatron_lite.parallel import ParallelContext
from tests.distributed import gather_full, max_dev
from tests.models.test_models_tp import VOCAB, tiny_cfg


def xl_cfg(**kw):
    base = dict(position_embedding="relative", num_layers=2, max_position_embeddings=16,
                seq_length=8)
    base.update(kw)
    return tiny_cfg("gpt", **base)


def _sinusoid(d: int, dim: int) -> torch.Tensor:
    """The encoding of one distance, from the paper's formula (sin half, cos half)."""
    freqs = [1.0 / 10000 ** (2 * k / dim) for k in range(dim // 2)]
    return torch.tensor([math.sin(d * f) for f in freqs] + [math.cos(d * f) for f in freqs])


def dense_attention(attn, u, v, h_all: torch.Tensor, qlen: int, clamp: int) -> torch.Tensor:
    """``(q_i + u) k_j + (q_i + v) W_R R_{i-j}`` for every (i, j) by explicit indexing, causal
    over [memory, segment]; softmax; times the values; the output projection."""
    b, klen, hidden = h_all.shape
    heads, d = u.shape
    mlen = klen - qlen
    q, k, val = attn.qkv(h_all).view(b, klen, 3, heads, d).unbind(2)  # [b, klen, H, d]
    q = q[:, mlen:]
    out = torch.zeros(b, qlen, heads, d)
    for i in range(qlen):
        for hd in range(heads):
            scores = torch.full((b, klen), float("-inf"))
            for j in range(mlen + i + 1):
                dist = mlen + i - j
                r = _sinusoid(min(dist, clamp) if clamp > 0 else dist, hidden)
                wr = (attn.r_proj.weight @ r).view(heads, d)[hd]
                scores[:, j] = ((q[:, i, hd] + u[hd]) * k[:, j, hd]).sum(-1) + \
                    ((q[:, i, hd] + v[hd]) * wr).sum(-1)
            p = torch.softmax(scores / math.sqrt(d), dim=-1)  # [b, klen]
            out[:, i, hd] = (p[:, :, None] * val[:, :, hd]).sum(1)
    return attn.proj(out.reshape(b, qlen, hidden))


@pytest.mark.parametrize("mlen,clamp", [(0, 0), (5, 0), (5, 3)])
def test_relative_attention_equals_the_dense_formula(mlen, clamp):
    torch.manual_seed(0)
    model = build_model(xl_cfg(clamp_len=clamp)).eval()
    attn, rel = model.transformer.layers[0].attn, model.transformer.rel
    h_all = torch.randn(2, mlen + 6, 32, requires_grad=True)
    got = attn(h_all, None, None, 0, None, rel.u, rel.v, 6)  # (u, v, qlen): the XL inputs
    want = dense_attention(attn, rel.u, rel.v, h_all, 6, clamp)
    assert max_dev(got, want) <= 1e-5
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [h_all, rel.u, rel.v, attn.r_proj.weight], g)
    grads_ref = torch.autograd.grad(want, [h_all, rel.u, rel.v, attn.r_proj.weight], g)
    for a, b in zip(grads, grads_ref, strict=True):
        assert max_dev(a, b) <= 1e-5


def test_two_segments_with_memory_equal_one_long_forward():
    """Nothing truncated (mem_len >= first segment): the memory is exactly the past."""
    torch.manual_seed(0)
    model = build_model(xl_cfg(mem_len=8)).eval()
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        full = model(ids)
        mem = Memory(8)
        first = model(ids[:, :8], memory=mem)
        second = model(ids[:, 8:], memory=mem)
    assert mem.length == 8
    assert max_dev(torch.cat([first, second], 1), full) <= 1e-5


def test_no_gradient_reaches_the_memory_and_mem_len_0_is_the_plain_path():
    torch.manual_seed(0)
    model = build_model(xl_cfg(mem_len=4)).train()
    ids = torch.randint(0, VOCAB, (2, 8))
    mem = Memory(4)
    model(ids, ids, memory=mem).backward()
    assert all(not t.requires_grad and t.grad_fn is None for t in mem.layers.values())
    assert mem.length == 4 and len(mem.layers) == 2  # one per attention sublayer
    loss = model(ids, ids, memory=mem)  # the second segment attends to the first
    loss.backward()
    plain = build_model(xl_cfg(mem_len=0))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.eval()(ids), model.eval()(ids, memory=Memory(0)))


def _check_tp(ctx):
    cfg = xl_cfg(mem_len=6, clamp_len=5)
    ctx.seed(0)
    model = build_model(cfg, ctx).eval()
    torch.manual_seed(0)
    dense = build_model(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    mems, dense_mems = Memory(6), Memory(6)
    for seg in (ids[:, :8], ids[:, 8:]):
        with torch.no_grad():
            got = gather_full(model(seg, memory=mems), ctx.tp_group, -1)[..., :VOCAB]
            want = dense(seg, memory=dense_mems)[..., :VOCAB]
        assert max_dev(got, want) <= 1e-5
    # training: one all-reduce forward and one backward per sublayer, gradients equal
    model.train(), dense.train()
    loss = model(ids[:, :8], ids[:, 1:9], memory=mems)
    loss_ref = dense(ids[:, :8], ids[:, 1:9], memory=dense_mems)
    loss.backward(), loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5
    for name, p in model.named_parameters():
        g = gather_full(p.grad, ctx.tp_group, p.tp_dim, p.tp_stride) \
            if getattr(p, "tp_dim", None) is not None else p.grad
        ref = dict(dense.named_parameters())[name].grad
        rows = min(g.shape[0], ref.shape[0])
        assert max_dev(g[:rows], ref[:rows]) <= 1e-5, name


@pytest.mark.parametrize("tp", [1, 2])
def test_relative_with_memory_matches_dense_at_tp(distributed, tp):
    distributed(_check_tp, tp)


def test_errors_for_what_xl_does_not_cover():
    from megatron_lite.config import ConfigError, load_config
    from megatron_lite.resolve import check_config

    for overrides, message in [
        (["model.arch=bert", "model.position_embedding=relative"], "GPT only"),
        (["model.mem_len=8"], "model.position_embedding=relative"),
        (["model.position_embedding=relative", "model.layernorm_order=post"], "pre-LN"),
        (["model.clamp_len=8"], "needs model.position_embedding=relative"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_config(load_config(None, overrides))
    pytest.importorskip("transformers")
    from megatron_lite.models.hf import to_hf

    with pytest.raises(ValueError, match="relative"):
        to_hf(build_model(xl_cfg()))


def test_loss_matches_cross_entropy():
    torch.manual_seed(0)
    model = build_model(xl_cfg(mem_len=4)).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        logits = model(ids, memory=Memory(4))[..., :VOCAB]
        loss = model(ids, ids, memory=Memory(4))
    assert abs(loss.item() - F.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))) < 1e-5


def test_generation_with_the_memory_equals_recomputing():
    from megatron_lite.generate import generate

    torch.manual_seed(0)
    model = build_model(xl_cfg(mem_len=20, init_std=0.5))
    prompt = [5, 17, 42, 7]
    for kwargs in (dict(greedy=True), dict(temperature=0.8, top_k=20, seed=3)):
        ours = generate(model, ParallelContext(), prompt, 16, **kwargs)  # 20 positions: all kept
        ref = generate(model, ParallelContext(), prompt, 16, use_cache=False, **kwargs)
        assert ours == ref, (kwargs, ours, ref)


def test_activation_checkpointing_gives_the_same_gradients_with_memory():
    grads = []
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = build_model(xl_cfg(mem_len=6, activation_checkpointing=mode)).train()
        mem = Memory(6)
        ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
        for seg in (slice(0, 8), slice(8, 16)):
            model(ids[:, seg], ids[:, seg.start + 1:seg.stop + 1], memory=mem).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert max_dev(g, other[name]) <= 1e-6, name
