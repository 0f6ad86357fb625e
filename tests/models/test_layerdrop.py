"""Sublayer orders (sandwich, PAR rules) and LayerDrop, against independent references."""

import dataclasses

import pytest
import torch

from megatron_lite.config import (
    ConfigError,
    layer_units,
    load_config,
    par_pattern,
    sandwich_pattern,
)
from megatron_lite.models import build_model, set_layerdrop_key
from megatron_lite.parallel import ParallelContext
from tests.distributed import gather_full, max_dev
from tests.models.test_models_tp import VOCAB, make_batch, tiny_cfg


@pytest.mark.parametrize("n,k,expected", [
    (1, 1, "sf"), (2, 1, "ssff"), (3, 1, "ssfsff"), (4, 2, "sssfsfff"), (4, 4, "ssssffff"),
    (6, 0, "sf" * 6), (16, 6, "s" * 6 + "sf" * 10 + "f" * 6),  # the paper's WT103 model
])
def test_sandwich_patterns(n, k, expected):
    assert sandwich_pattern(n, k) == expected
    assert expected.count("s") == expected.count("f") == n  # same sublayers as (sf)^n


@pytest.mark.parametrize("n,p,expected", [
    (8, 5, "sffsfffsffffffff"),  # 3 of 16 blocks attention, lower 11 blocks
    (6, 3, "sfsfsfsfffff"),  # 4 of 12, lower 8
    (4, 1.5, "sssssfff"),  # 5 of 8: the lower two thirds (5 blocks) are all attention
])
def test_par_placement(n, p, expected):
    got = par_pattern(n, p)
    assert got == expected and len(got) == 2 * n
    a, region = round(2 * n / p), round(4 * n / 3)
    assert got.count("s") == a and "s" not in got[region:]  # none in the upper third


@pytest.mark.parametrize("overrides,message", [
    (["model.num_layers=4", "model.sandwich_coefficient=5"], "must be in [0, model.num_layers"),
    (["model.sandwich_coefficient=1", "model.par_ratio=3"], "two sublayer orders"),
    (["model.num_layers=2", "model.sublayer_pattern=sfsf", "model.sandwich_coefficient=1"],
     "give different orders"),
    (["model.num_layers=2", "model.par_ratio=0.5"], "must be >= 1"),
    (["model.num_layers=2", "model.par_ratio=100"], "0 attention blocks"),
    (["model.layerdrop=1.0"], "model.layerdrop=1.0 must be in [0, 1)"),
    (["model.num_layers=4", "model.layers_to_keep=0,4"], "layer 4 out of range"),
    (["model.num_layers=4", "model.layers_to_keep=1,1"], "repeats a layer"),
    (["model.layerdrop_granularity=block"], "is not one of layer, sublayer"),
])
def test_order_and_layerdrop_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_config_holds_the_chosen_pattern_and_rebuilds_it():
    cfg = load_config(None, ["model.num_layers=4", "model.sandwich_coefficient=2",
                             "model.sublayer_pattern=sssfsfff"])  # as config.yaml has it
    assert cfg.validate().model.pattern == "sssfsfff"


def _kept_model(cfg, model, run):
    """An independent model holding only the sublayers that ran (copied weights)."""
    kept = [i for i, r in enumerate(run) if r]
    small_cfg = dataclasses.replace(cfg, sublayer_pattern="".join(cfg.pattern[i] for i in kept),
                                    layerdrop=0.0, num_layers=cfg.num_layers)
    small = build_model(small_cfg)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("transformer.layers."):
            i, rest = name.split(".", 3)[2:]
            if int(i) in kept:
                state[f"transformer.layers.{kept.index(int(i))}.{rest}"] = t
        else:
            state[name] = t
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("granularity", ["layer", "sublayer"])
def test_dropped_forward_equals_the_model_of_the_kept_sublayers(granularity):
    cfg = tiny_cfg("gpt", num_layers=4, layerdrop=0.5, layerdrop_granularity=granularity)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = make_batch("gpt")
    seen = set()
    for step in range(6):
        set_layerdrop_key(model, (1, step, 0))
        run = model.transformer.layerdrop.plan(8, training=True)
        if granularity == "layer":  # whole sf pairs go together
            assert all(run[i] == run[i + 1] for i in range(0, 8, 2))
        seen.add(tuple(run))
        set_layerdrop_key(model, (1, step, 0))
        loss = model(**batch)
        ref = _kept_model(cfg, model, run).train()(**batch)
        assert abs(loss.item() - ref.item()) <= 1e-6, (run, loss.item(), ref.item())
    assert len(seen) > 2  # the decisions change with the step
    model.eval()  # never drops in evaluation
    with torch.no_grad():
        full = dataclasses.replace(cfg, layerdrop=0.0)
        dense = build_model(full)
        dense.load_state_dict(model.state_dict())
        assert torch.equal(model(batch["input_ids"]), dense.eval()(batch["input_ids"]))


def test_decisions_depend_on_the_key_and_dp_rank_only():
    cfg = tiny_cfg("gpt", num_layers=8, layerdrop=0.5)
    a, b = build_model(cfg).transformer.layerdrop, build_model(cfg).transformer.layerdrop
    plans = set()
    for key in [(1, 3, 0), (1, 3, 1), (1, 4, 0), (2, 3, 0)]:
        a.key = b.key = key
        torch.manual_seed(key[1])  # the global RNG plays no part
        assert a.plan(16, True) == b.plan(16, True)
        plans.add(tuple(a.plan(16, True)))
    assert len(plans) == 4
    other_dp = build_model(cfg, ParallelContext(dp_rank=1, dp_size=2)).transformer.layerdrop
    other_dp.key = a.key = (1, 3, 0)
    assert other_dp.plan(16, True) != a.plan(16, True)  # DP ranks draw their own
    ends = build_model(dataclasses.replace(cfg, layerdrop=0.9, layerdrop_keep_ends=True))
    for step in range(20):
        set_layerdrop_key(ends, (1, step, 0))
        run = ends.transformer.layerdrop.plan(16, True)
        assert run[:2] == run[-2:] == [True, True]


def test_checkpointing_gives_the_same_gradients_with_layerdrop():
    grads = []
    for mode in ("none", "full", "selective"):
        cfg = tiny_cfg("gpt", num_layers=4, layerdrop=0.5, activation_checkpointing=mode)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        for step in range(3):
            set_layerdrop_key(model, (7, step, 0))
            model(**make_batch("gpt", seed=step)).backward()
        assert all(p.grad is not None for p in model.parameters())  # zero where dropped
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert torch.equal(g, other[name]), name


def _check_layers_to_keep_under_tp(ctx):
    cfg = tiny_cfg("gpt", num_layers=4)
    ctx.seed(0)
    model = build_model(dataclasses.replace(cfg, layers_to_keep="0,3"), ctx).eval()
    torch.manual_seed(0)
    dense = build_model(cfg).eval()
    batch = make_batch("gpt")
    units = layer_units(cfg.pattern)
    run = [any(a <= i < b for a, b in (units[0], units[3])) for i in range(8)]
    ref = _kept_model(cfg, dense, run).eval()
    with torch.no_grad():
        got = gather_full(model(batch["input_ids"]), ctx.tp_group, -1)[..., :VOCAB]
        want = ref(batch["input_ids"])[..., :VOCAB]
    assert max_dev(got, want) <= 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_layers_to_keep_equals_the_kept_model_at_tp(distributed, tp):
    distributed(_check_layers_to_keep_under_tp, tp)


def test_hf_export_refuses_what_gpt2_cannot_hold():
    pytest.importorskip("transformers")
    from megatron_lite.models.hf import to_hf

    sandwich = build_model(tiny_cfg("gpt", num_layers=2, sandwich_coefficient=1))
    with pytest.raises(ValueError, match=r"'ssff' is not \(sf\)\^2"):
        to_hf(sandwich)
    with pytest.raises(ValueError, match="python -m megatron_lite.prune"):
        to_hf(build_model(tiny_cfg("gpt", num_layers=2, layers_to_keep="0")))
