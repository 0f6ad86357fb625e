"""Shipped configs: they load, validate, have the published sizes, and big ones build sharded."""

import dataclasses
import resource
from pathlib import Path

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.models import build_model
from megatron_lite.resolve import check_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/*/*.yaml"))


def _count(cfg, ctx=None) -> int:
    return sum(p.numel() for p in build_model(cfg, ctx, device="meta").parameters())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_loads_validates_and_builds(path):
    cfg = load_config(path)
    check_config(cfg, world_size=cfg.parallel.tensor_parallel_size)
    assert _count(cfg.model) > 0


# the published sizes, exactly: Hugging Face's GPT2LMHeadModel / BertForPreTraining of the
# released checkpoints (tied output layer counted once; BERT with its MLM and NSP heads)
PUBLISHED = {"gpt2/124m": 124_439_808, "gpt2/355m": 354_823_168, "gpt2/774m": 774_030_080,
             "gpt2/1.5b": 1_557_611_200, "bert/base": 110_106_428, "bert/large": 336_226_108}


def _config(name):
    return load_config(next(p for p in CONFIGS if f"{p.parent.name}/{p.stem}" == name))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_are_the_published_ones(name):
    cfg = _config(name)
    m = cfg.model
    unpadded = dataclasses.replace(m, make_vocab_size_divisible_by=1)
    assert _count(unpadded) == PUBLISHED[name]
    # the padding (to 128 rows at TP=1) adds embedding rows, and BERT's MLM bias entries
    padded = build_model(m, device="meta").padded_vocab_size
    extra = (padded - m.vocab_size) * (m.hidden_size + (m.arch == "bert"))
    assert _count(m) == PUBLISHED[name] + extra


@pytest.mark.parametrize("name", ["gpt2/124m", "bert/base"])
def test_parameter_counts_equal_transformers(name):
    """The same count from the independent implementation, built on the meta device."""
    transformers = pytest.importorskip("transformers")
    from megatron_lite.models.hf import hf_config_from

    m = dataclasses.replace(_config(name).model, make_vocab_size_divisible_by=1)
    cls = transformers.GPT2LMHeadModel if m.arch == "gpt" else (
        transformers.MegatronBertForPreTraining if m.layernorm_order == "pre"
        else transformers.BertForPreTraining)
    with torch.device("meta"):
        hf = cls(hf_config_from(m))
    assert sum(p.numel() for p in hf.parameters()) == _count(m)


@pytest.mark.parametrize("name,billions", [("gpt2/8.3b", 8.3), ("bert/3.9b", 3.9)])
def test_megatron_paper_sizes(name, billions):
    """The Megatron-LM paper's models, whose sizes it gives rounded."""
    got = _count(_config(name).model) / 1e9
    assert abs(got - billions) / billions < 0.01, f"{name}: {got:.3f}B parameters"


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
