"""The hook interface: what the models' parts offer, one hook of each kind."""

import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.hooks import TrainingHook, model_hooks
from megatron_lite.models import build_model

SMALL = ["model.num_layers=2", "model.hidden_size=16", "model.num_attention_heads=2",
         "model.seq_length=8", "model.max_position_embeddings=8", "model.vocab_size=64"]


def _names(overrides):
    cfg = load_config(None, SMALL + overrides)
    return [type(h).__name__ for h in model_hooks(build_model(cfg.model), cfg)]


def test_each_part_offers_its_hook_once():
    assert _names([]) == []
    assert _names(["model.layerdrop=0.5"]) == ["LayerDropHook"]
    xl = ["model.position_embedding=relative", "model.mem_len=8", "data.ordering=consecutive"]
    assert _names(xl) == ["MemoryHook"]
    # every attention sublayer's span offers a SpanHook: one is kept
    assert _names(xl + ["model.adaptive_span=true", "model.attn_span=8",
                        "model.adaptive_span_ramp=2", "model.layerdrop=0.5"]) == \
        ["LayerDropHook", "SpanHook", "MemoryHook"]
    bert = ["model.arch=bert"]
    assert _names(bert) == ["BertStatsHook"]
    assert _names(bert + ["train.phase2_seq_length=8"]) == ["BertStatsHook", "BertPhase2Hook"]


def test_a_memory_with_shuffled_samples_is_refused_by_its_hook():
    with pytest.raises(ConfigError, match="needs data.ordering=consecutive"):
        _names(["model.position_embedding=relative", "model.mem_len=8"])


def test_the_base_hook_does_nothing():
    hook, batch = TrainingHook(), {"input_ids": None}
    assert hook.micro_batch(None, batch, 0) is batch and hook.loss(None, batch) is None
    assert hook.extra_loss(None) == 0.0 and hook.step_metrics(None) == {}
    assert hook.state_dict() == {} and hook.meta_state() == {} and not hook.should_stop(None)
