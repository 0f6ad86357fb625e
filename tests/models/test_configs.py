"""Shipped configs: they load, validate, have the published sizes, and big ones build sharded."""

import resource
from pathlib import Path

import pytest

from megatron_lite.config import load_config
from megatron_lite.models import build_model

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/*/*.yaml"))


def _count(cfg, ctx=None) -> int:
    return sum(p.numel() for p in build_model(cfg, ctx, device="meta").parameters())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_loads_validates_and_builds(path):
    cfg = load_config(path)
    cfg.validate(world_size=cfg.parallel.tensor_parallel_size)
    assert _count(cfg.model) > 0


# published sizes, with the vocab padded to a multiple of 128 (TP=1)
@pytest.mark.parametrize("name,millions", [
    ("gpt2/124m", 124.5), ("gpt2/355m", 355.0), ("gpt2/774m", 774.0), ("gpt2/1.5b", 1557.7),
    ("gpt2/8.3b", 8300.0), ("bert/base", 110.0), ("bert/large", 336.0), ("bert/3.9b", 3900.0),
])
def test_parameter_counts(name, millions):
    cfg = load_config(next(p for p in CONFIGS if f"{p.parent.name}/{p.stem}" == name))
    got = _count(cfg.model) / 1e6
    assert abs(got - millions) / millions < 0.015, f"{name}: {got:.1f}M parameters"


def _sharded_counts(ctx) -> None:
    cfg = load_config(next(p for p in CONFIGS if p.parent.name == "gpt2" and p.stem == "1.5b"))
    tp = ctx.tp_size
    dense = dict(build_model(cfg.model, device="meta").named_parameters())
    model = build_model(cfg.model, ctx, device="meta")
    sharded = replicated = 0
    for name, p in model.named_parameters():
        ref = dense[name]
        if getattr(p, "tp_dim", None) is None:
            assert p.shape == ref.shape, name
            replicated += p.numel()
        elif getattr(p, "vocab_dim", None) is not None:  # padded to 128 x TP, then split
            assert p.shape[0] * tp == model.padded_vocab_size == 50688, name
            sharded += p.numel()
        else:
            assert p.numel() * tp == ref.numel(), name
            sharded += p.numel()
    total_sharded = sum(p.numel() for n, p in dense.items()
                        if getattr(p, "tp_dim", None) is not None)
    # every rank holds 1/4 of the sharded weights (vocab padded for TP=4) and all of the
    # replicated ones (LayerNorms, row-parallel biases, position embeddings)
    assert sharded == (total_sharded + (50688 - 50304) * 1600) // tp
    assert replicated < 0.01 * sharded

    # memory: the real thing, 16 layers of the 1.5B shape. Peak RSS growth while building
    # is this rank's shard plus at most one full weight (the 50688 x 1600 embedding).
    cfg.model.num_layers = 16
    rss_before = _rss_bytes()
    model = build_model(cfg.model, ctx)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in build_model(
        cfg.model, device="meta").parameters())
    largest_full = 50688 * 1600 * 4
    if ctx.rank == 0:
        print(f"1.5B shape, 16 layers, TP={tp}: shard {shard_bytes / 2**20:.0f} MiB, "
              f"peak build growth {peak / 2**20:.0f} MiB, full model {full_bytes / 2**20:.0f} MiB")
    assert peak <= shard_bytes + largest_full + 64 * 2**20
    assert peak < full_bytes / 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_1p5b_builds_sharded_at_tp4(distributed):
    distributed(_sharded_counts, 4)


def test_bad_config_names_file_and_key(tmp_path):
    from megatron_lite.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden: 10\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key model.hidden"):
        load_config(bad)
