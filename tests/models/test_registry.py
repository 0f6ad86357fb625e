"""Parts chosen by config: a new part is one class plus its registration."""

import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.models import build_model
from megatron_lite.models.attention import MathCore
from megatron_lite.models.positions import PositionScheme
from megatron_lite.models.registry import ATTENTION_CORES, POSITIONS, REGISTRIES
from megatron_lite.resolve import check_config
from tests.distributed import max_dev
from tests.models.test_models_tp import VOCAB, tiny_cfg


@pytest.fixture
def nope_scheme():
    """A position scheme written the way a new part is: no positions at all (NoPE)."""

    @POSITIONS.register("nope_for_test")
    class NoPositions(PositionScheme):
        @classmethod
        def problems(cls, cfg):
            return ["model.position_embedding=nope_for_test is causal only"] \
                if cfg.model.arch != "gpt" else []

    yield NoPositions
    del POSITIONS._parts["nope_for_test"]


def test_a_registered_position_scheme_is_built_and_checked(nope_scheme):
    torch.manual_seed(0)
    nope = build_model(tiny_cfg("gpt", position_embedding="nope_for_test")).eval()
    assert nope.wpe is None and not any("wpe" in n for n, _ in nope.named_parameters())
    # reference: learned positions whose table is all zeros, the same other weights
    learned = build_model(tiny_cfg("gpt")).eval()
    state = dict(nope.state_dict(), **{"wpe.weight": torch.zeros_like(learned.wpe.weight)})
    learned.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert max_dev(nope(ids), learned(ids)) == 0.0
    # the part's own check is part of the one config error
    cfg = load_config(None, ["model.arch=bert", "model.position_embedding=nope_for_test"])
    with pytest.raises(ConfigError, match="nope_for_test is causal only"):
        check_config(cfg)


def test_an_attention_core_registered_by_a_test_runs_in_the_model():
    calls = []

    @ATTENTION_CORES.register("counting_for_test")
    class CountingCore(MathCore):
        def forward(self, q, k, v, mask, causal, z=None):
            calls.append(q.shape)
            return super().forward(q, k, v, mask, causal, z)

    try:
        torch.manual_seed(0)
        model = build_model(tiny_cfg("gpt", attention_core="counting_for_test")).eval()
        torch.manual_seed(0)
        sdpa = build_model(tiny_cfg("gpt")).eval()
        ids = torch.randint(0, VOCAB, (2, 8))
        with torch.no_grad():
            assert max_dev(model(ids), sdpa(ids)) <= 1e-5  # the written-out softmax
        assert len(calls) == model.cfg.pattern.count("s")
    finally:
        del ATTENTION_CORES._parts["counting_for_test"]


def test_unknown_part_and_a_key_of_another_part_are_one_line():
    cfg = load_config(None, ["model.position_embedding=rotary_nope", "model.normalization=x"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    msg = str(err.value)
    assert "model.position_embedding='rotary_nope' is not one of learned, relative" in msg
    assert "model.normalization='x' is not one of layernorm" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"model.clamp_len=4 needs "
                                          r"model.position_embedding=relative \(it caps"):
        check_config(load_config(None, ["model.clamp_len=4"]))


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        POSITIONS.register("learned")(type("Again", (PositionScheme,), {}))
    assert all(registry.names() for registry in REGISTRIES)
