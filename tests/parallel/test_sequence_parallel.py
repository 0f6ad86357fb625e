"""Sequence parallelism (Korthikanti et al. 2022, ``parallel.sequence_parallel``) against
independent references: the dense one-process model, the collectives it makes, and the
TP ranks' norm weights (the trainer: tests/training/test_sequence_parallel_training.py)."""

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError, load_config
from megatron_lite.experiments.search import build_supernet
from megatron_lite.models import KVCache, build_model
from megatron_lite.models.transformer import region_dropout
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import all_gather_list
from megatron_lite.parallel.mappings import (
    gather_from_sequence_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    sequence_parallel_linear,
)
from megatron_lite.plan import (
    activation_bytes,
    apply_overrides,
    measured_activation_bytes,
    plan,
    suggest,
)
from megatron_lite.resolve import check_config
from tests.distributed import max_dev
from tests.models.test_models_tp import (
    _check_activation_checkpointing,
    _check_against_dense,
    make_batch,
    tiny_cfg,
)

ROOT = Path(__file__).resolve().parents[2]


def _with_sp(ctx, check, *args) -> None:
    ctx.sequence_parallel.enabled = True
    check(ctx, *args)
    assert ctx.sequence_parallel.active, "the forward did not split the sequence"


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_sequence_parallel_model_matches_dense(distributed, arch, tp):
    # logits, loss and every gradient (the norms' ones summed over TP) at identical
    # parameters, then the parameters after 3 AdamW steps
    distributed(_with_sp, tp, _check_against_dense, arch)


def _check_mappings(ctx) -> None:
    """Each mapping's forward and backward against the dense computation it stands for."""
    g, t, r = ctx.tp_group, ctx.tp_size, ctx.tp_rank
    torch.manual_seed(0)  # the same full tensors on every rank
    full = torch.randn(2, 8, 6, dtype=torch.float64)
    weight = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 8, 10, dtype=torch.float64)
    mine = full.chunk(t, dim=1)[r]
    # a column-parallel core from the shard: all of y, dX reduce-scattered, dW of all
    x = mine.clone().requires_grad_()
    y = sequence_parallel_linear(x, weight, bias, g)
    (y * up).sum().backward()
    x_ref = full.clone().requires_grad_()
    w_ref, b_ref = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, w_ref, b_ref)
    (y_ref * up * t).sum().backward()  # every rank's partial gradient is the whole one
    assert max_dev(y, y_ref) < 1e-12
    assert max_dev(x.grad, x_ref.grad.chunk(t, dim=1)[r]) < 1e-12
    assert max_dev(weight.grad, w_ref.grad / t) < 1e-12
    assert max_dev(bias.grad, b_ref.grad / t) < 1e-12
    # reduce-scatter out of a row-parallel core: sum of the ranks' partials, own slice
    part = (full * (r + 1)).requires_grad_()
    out = reduce_scatter_to_sequence_region(part, g)
    assert max_dev(out, (full * sum(range(1, t + 1))).chunk(t, dim=1)[r]) < 1e-12
    out.backward(torch.ones_like(out) * (r + 1))
    expect = torch.cat([torch.ones_like(c) * (i + 1) for i, c in enumerate(full.chunk(t, 1))], 1)
    assert torch.equal(part.grad, expect)
    # scatter in, gather out (replicated consumer: backward keeps own slice)
    x = full.clone().requires_grad_()
    back = gather_from_sequence_region(scatter_to_sequence_region(x, g), g, partial_grad=False)
    assert torch.equal(back, full)
    back.backward(up[..., :6])
    assert torch.equal(x.grad, up[..., :6])


def test_sequence_parallel_mappings_against_dense(distributed):
    distributed(_check_mappings, 2)


def _check_dropout(ctx, arch: str) -> None:
    ctx.sequence_parallel.enabled = True
    # checkpointed (full, selective) and not: the same loss and gradients bit for bit
    _check_activation_checkpointing(ctx, arch)
    # the region's dropout draws from the TP stream: the ranks' tokens get their own masks
    ctx.seed(5)
    ctx.sequence_parallel.active = True
    masks = all_gather_list(region_dropout(torch.ones(64), 0.5, True, ctx.rng,
                                           ctx.sequence_parallel), ctx.tp_group)
    assert not torch.equal(masks[0], masks[1]), "the TP ranks drew the same dropout mask"


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_sequence_parallel_checkpointing_reproduces_dropout(distributed, arch):
    distributed(_check_dropout, 2, arch)


@contextlib.contextmanager
def _counting(*names):
    calls = dict.fromkeys(names, 0)
    originals = {n: getattr(dist, n) for n in names}

    def counter(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for n in names:
        setattr(dist, n, counter(n))
    try:
        yield calls
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)


def _check_collectives(ctx, arch: str) -> None:
    ctx.sequence_parallel.enabled = True
    names = ("all_reduce", "all_gather", "reduce_scatter")
    counts = {}
    for layers in (1, 3):
        ctx.seed(0)
        model = build_model(tiny_cfg(arch, num_layers=layers), ctx)
        with _counting(*names) as fwd:
            loss = model(**make_batch(arch))
        with _counting(*names) as bwd:
            loss.backward()
        counts[layers] = fwd, bwd
    (f1, b1), (f3, b3) = counts[1], counts[3]
    per_layer = {n: (f3[n] - f1[n]) / 2 for n in names}
    # forward, per layer: an all-gather into each core (QKV, fc1) and a reduce-scatter out
    # of each (proj, fc2); no all-reduce (they replaced both of plain TP's)
    assert per_layer == {"all_reduce": 0, "all_gather": 2, "reduce_scatter": 2}, per_layer
    # backward, per layer: the conjugates (a reduce-scatter of dX into each core, an
    # all-gather of the gradient out of each), the cores' inputs gathered again for dW;
    # all-reduces only of the replicated parameters' gradients in the sequence-parallel
    # region: each sublayer's norm weight and bias and the row-parallel bias
    per_layer = {n: (b3[n] - b1[n]) / 2 for n in names}
    assert per_layer == {"all_reduce": 6, "all_gather": 4, "reduce_scatter": 2}, per_layer
    if arch == "gpt":  # whole model: the head's gather (backward: reduce-scatter)
        assert f1["all_gather"] == 3 and b1["reduce_scatter"] == 3, (f1, b1)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_sequence_parallel_collective_count(distributed, arch):
    distributed(_check_collectives, 2, arch)


def _check_norms_stay_in_step(ctx) -> None:
    """The norms' weights are replicated but see only this rank's tokens: without the
    gradient sum over TP they drift apart in a few steps."""
    ctx.sequence_parallel.enabled = True
    ctx.seed(0)
    model = build_model(tiny_cfg("gpt"), ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        model(**make_batch("gpt", seed=step)).backward()
        opt.step()
        opt.zero_grad()
    marked = [(n, p) for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]
    assert {n for n, _ in marked} >= {"transformer.final_ln.weight",
                                      "transformer.layers.0.ln.weight",
                                      "transformer.layers.1.mlp.fc2.bias"}
    for name, p in marked:
        copies = all_gather_list(p.detach(), ctx.tp_group)
        assert torch.equal(copies[0], copies[1]), f"{name} differs between the TP ranks"


def test_sequence_parallel_norm_gradients_are_summed_over_tp(distributed):
    distributed(_check_norms_stay_in_step, 2)


@pytest.mark.parametrize("overrides,message", [
    (["model.seq_length=30"], "needs model.seq_length=30 divisible by"),
    (["model.position_embedding=relative", "model.mem_len=8", "data.ordering=consecutive"],
     "does not support model.position_embedding=relative"),
])
def test_sequence_parallel_refusals_are_one_line(overrides, message):
    cfg = load_config(None, ["parallel.tensor_parallel_size=4", "parallel.sequence_parallel=true",
                             "model.hidden_size=32", "model.num_attention_heads=4",
                             "model.max_position_embeddings=64", "train.global_batch_size=4",
                             *overrides])
    with pytest.raises(ConfigError, match=message) as err:
        check_config(cfg, world_size=4)
    assert "\n" not in str(err.value)
    # a no-op at TP=1: nothing to refuse
    cfg.parallel.tensor_parallel_size = 1
    assert not [p for p in cfg.problems() if "sequence_parallel" in p]


def _check_generation_falls_back(ctx) -> None:
    """Sequences not divisible by TP and decoding steps with a KV cache run plain TP
    (same weights, same logits): neither padded nor refused."""
    ctx.seed(0)
    model = build_model(tiny_cfg("gpt"), ctx).eval()
    ids = make_batch("gpt")["input_ids"][:, :7]  # 7: not divisible by 2
    ref = model(ids)
    ref_cached = [model(ids[:, :4], cache=(cache := KVCache())), model(ids[:, 4:5], cache=cache)]
    ctx.sequence_parallel.enabled = True
    got = model(ids)
    assert not ctx.sequence_parallel.active and torch.equal(got, ref)
    got_cached = [model(ids[:, :4], cache=(cache := KVCache())), model(ids[:, 4:5], cache=cache)]
    assert all(torch.equal(a, b) for a, b in zip(got_cached, ref_cached, strict=True))
    even = model(ids[:, :6])  # divisible: split, same logits as plain TP
    assert ctx.sequence_parallel.active
    ctx.sequence_parallel.enabled = False
    assert max_dev(even, model(ids[:, :6])) < 1e-6


def test_sequence_parallel_generation_and_odd_lengths_run_plain_tp(distributed):
    distributed(_check_generation_falls_back, 2)


PLAN_TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.seq_length=64", "model.max_position_embeddings=64", "model.vocab_size=500",
             "model.make_vocab_size_divisible_by=8", "model.hidden_dropout=0.1",
             "model.attention_dropout=0.1", "parallel.tensor_parallel_size=2"]


def _measure_saved(ctx, overrides, out):
    cfg = load_config(None, overrides)
    ctx.sequence_parallel.enabled = cfg.parallel.sequence_parallel
    model = build_model(cfg.model, ctx)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 500, (2, 64), generator=g),
             "labels": torch.randint(0, 500, (2, 64), generator=g)}
    saved = measured_activation_bytes(model, batch, "fp32", ctx.device)
    if ctx.rank == 0:
        Path(out).write_text(str(saved))


@pytest.mark.parametrize("ck", ["none", "selective"])
def test_planner_counts_sequence_parallelism(distributed, tmp_path, ck):
    """What autograd keeps on a TP rank with and without sequence parallelism: the
    planner's figure within 5 % of each, and the split really shrinks it."""
    got = {}
    for sp in (False, True):
        over = PLAN_TINY + [f"model.activation_checkpointing={ck}",
                            f"parallel.sequence_parallel={str(sp).lower()}"]
        distributed(_measure_saved, 2, over, str(tmp_path / "saved"))
        measured = int((tmp_path / "saved").read_text())
        predicted = activation_bytes(load_config(None, over), 2, 2)["saved"]
        assert abs(predicted / measured - 1) <= 0.05, (sp, predicted, measured)
        got[sp] = measured
    assert got[True] < 0.9 * got[False]


def test_planner_suggests_sequence_parallelism_when_a_layout_does_not_fit():
    cfg = load_config(ROOT / "configs/gpt2/8.3b.yaml", ["train.micro_batch_size=8"])
    with torch.device("meta"):
        plain = plan(cfg, 8, 1, "a100-80g")
        fix = suggest(cfg, 8, 1, f"{int(plain['memory_per_rank']['total'] * 0.95 / 2**20)}M")
        assert fix == {"overrides": ["parallel.sequence_parallel=true"], "tp": 8,
                       "why": fix["why"]}
        sp = plan(apply_overrides(cfg, fix["overrides"]), 8, 1, "a100-80g")
    assert sp["config"]["sequence_parallel"]
    assert sp["memory_per_rank"]["activations"] < plain["memory_per_rank"]["activations"]


def _check_supernet(ctx) -> None:
    """PAR's supernet: its branch weights and final norm see this rank's tokens only;
    with their gradients summed over TP it equals the dense supernet."""
    cfg = tiny_cfg("gpt")
    make = build_supernet(3, "sfi")
    ctx.sequence_parallel.enabled = True
    ctx.seed(0)
    model = make(cfg, ctx).train()
    torch.manual_seed(0)
    dense = make(cfg, ParallelContext()).train()
    batch = make_batch("gpt")
    loss, ref = model(**batch), dense(**batch)
    loss.backward()
    ref.backward()
    assert ctx.sequence_parallel.active and abs(loss.item() - ref.item()) <= 1e-5
    for name in ("transformer.alpha", "transformer.final_ln.weight"):
        got = dict(model.named_parameters())[name].grad
        want = dict(dense.named_parameters())[name].grad
        assert max_dev(got, want) <= 1e-5, name


def test_sequence_parallel_supernet_matches_dense(distributed):
    distributed(_check_supernet, 2)
