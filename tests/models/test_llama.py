"""Llama-family decoders: each part against its definition, the whole model against
transformers' LlamaForCausalLM (random init, no downloads) at TP 1, 2 and 4, and against
the same model built dense in one process (gradients of shared K/V heads included)."""

import dataclasses
import math
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import Config, ConfigError, ModelConfig, load_config
from megatron_lite.generate import generate
from megatron_lite.models import KVCache, build_model
from megatron_lite.models.hf import from_hf, full_state_to_hf, to_hf
from megatron_lite.models.mlp import SwiGLU
from megatron_lite.models.norms import RMSNorm
from megatron_lite.models.rotary import RotaryPositions, apply_rope, rope_angles
from megatron_lite.parallel import ParallelContext, full_state_dict
from megatron_lite.resolve import check_config
from tests.distributed import gather_full, max_dev
from tests.models.test_models_tp import _check_activation_checkpointing, _check_against_dense
from tests.parallel.test_sequence_parallel import _with_sp

TOL = 1e-4
VOCAB = 97  # odd on purpose: padded differently at every TP size
# the parts of a Llama, as model keys (tests/models/test_models_tp.py's tiny model has 4
# heads: 2 K/V groups split over TP 2, shared by pairs of ranks at TP 4)
LLAMA = dict(num_query_groups=2, normalization="rmsnorm", activation="swiglu",
             position_embedding="rope", add_bias_linear=False,
             untie_embeddings_and_output_weights=True, rope_theta=500.0)


# ---------------------------------------------------------------------------------------
# the parts against their definitions
# ---------------------------------------------------------------------------------------


def _complex_rotation(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE from its formula: pair j of a head is the complex number x_j + i x_{j+d/2}
    (transformers' half-split layout), multiplied by e^{i m theta^(-2j/d)} at position m."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    freqs = torch.tensor([theta ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
    angle = positions.double()[:, None] * freqs[None, :]  # [s, d/2]
    out = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([out.real, out.imag], dim=-1)


def test_rope_is_the_complex_rotation_and_offsets_under_the_cache():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)  # [b, heads, s, d]
    positions = torch.arange(5, 12)
    cos, sin = rope_angles(positions, 16, theta=10000.0)
    ours = apply_rope(x, cos, sin)
    assert max_dev(ours, _complex_rotation(x, positions, 10000.0)) < 1e-5
    # linear scaling: position m is rotated as m / factor
    cos, sin = rope_angles(positions, 16, theta=10000.0, scale=4.0)
    assert max_dev(apply_rope(x, cos, sin),
                   _complex_rotation(x, positions / 4.0, 10000.0)) < 1e-5
    # the scheme: queries and keys after 5 cached positions are rotated at 5..11
    cfg = ModelConfig(hidden_size=48, num_attention_heads=3, position_embedding="rope",
                      rope_theta=10000.0)
    scheme = RotaryPositions(cfg)
    cache = KVCache()
    cache.extend(0, torch.zeros(2, 3, 5, 16), torch.zeros(2, 3, 5, 16))
    cache.length = 5
    attn = type("Attn", (), {"causal": True})()
    q, k, _, _, _ = scheme.attend(attn, x, x, x, None, cache, 0)
    assert max_dev(q, _complex_rotation(x, positions, 10000.0)) < 1e-5
    assert max_dev(k[:, :, 5:], q) == 0.0  # the keys were rotated alike, then cached
    # what makes it relative: a score depends on positions only through m - n
    a, b = torch.randn(16), torch.randn(16)

    def score(m, n):
        qa = _complex_rotation(a.view(1, 16), torch.tensor([m]), 10000.0)
        kb = _complex_rotation(b.view(1, 16), torch.tensor([n]), 10000.0)
        return (qa * kb).sum().item()

    assert math.isclose(score(7, 3), score(104, 100), rel_tol=1e-9)


def test_rope_matches_transformers_apply_rotary_pos_emb_without_a_permutation():
    """transformers' Llama stores Q/K rows in the half-split layout RoPE is applied in
    here: the same rows rotate the same way, so conversion copies them unpermuted."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8)
    cos, sin = rope_angles(torch.arange(9), 8, theta=500.0)
    ref_q, ref_k = llama.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.equal(apply_rope(q, cos, sin), ref_q)
    assert torch.equal(apply_rope(k, cos, sin), ref_k)


def test_swiglu_and_rmsnorm_are_their_definitions():
    torch.manual_seed(2)
    cfg = ModelConfig(hidden_size=16, ffn_hidden_size=24, add_bias_linear=False,
                      activation="swiglu", normalization="rmsnorm", layernorm_epsilon=1e-6)
    mlp = SwiGLU(cfg, ParallelContext())
    x = torch.randn(3, 5, 16)
    w_gate, w_up = mlp.fc1.weight[:24], mlp.fc1.weight[24:]
    gate = x @ w_gate.T
    ref = (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ mlp.fc2.weight.T  # Shazeer 2020
    assert max_dev(mlp(x), ref) < 1e-6
    assert mlp.fc1.bias is None and mlp.fc2.bias is None
    norm = RMSNorm(cfg)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    ref = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 16 + 1e-6) * norm.weight
    assert max_dev(norm(x), ref) < 1e-6
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # no bias


# ---------------------------------------------------------------------------------------
# the model against the same model dense, and transformers' LlamaForCausalLM
# ---------------------------------------------------------------------------------------


def test_llama_matches_dense_with_grads_of_shared_kv_heads(distributed):
    """TP 4 shares each of the 2 K/V heads by two ranks: logits, loss, every gradient (the
    shared K/V weights' summed over the ranks sharing them) and 3 AdamW steps equal the
    one-process model's. (TP 2, K/V heads split: the training test below.)"""
    distributed(_check_against_dense, 4, "gpt", LLAMA)


def test_llama_activation_checkpointing_gives_identical_gradients(distributed):
    distributed(_check_activation_checkpointing, 4, "gpt", LLAMA)


transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_llama(kv_heads: int = 2, tied: bool = False, rope: dict | None = None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32,
        rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 500.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # RMSNorm gains start at 1: perturb so a swapped one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _reference(kv_heads: int, tied: bool, rope: dict | None) -> dict:
    """transformers' side, computed once here: the ranks get plain tensors and the config's
    fields (no transformers import per rank, the slowest part of starting one)."""
    hf = hf_llama(kv_heads, tied, rope)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        out = hf(input_ids=ids, labels=ids)
        generated = hf.generate(ids[:1, :5], max_new_tokens=14, do_sample=False,
                                pad_token_id=0)[0, 5:].tolist()
    return {"config": types.SimpleNamespace(**hf.config.to_dict()), "state": hf.state_dict(),
            "ids": ids, "logits": out.logits, "loss": out.loss.item(), "generated": generated}


def _check_hf_parity(ctx, ref: dict) -> None:
    stand_in = types.SimpleNamespace(config=ref["config"], state_dict=lambda: ref["state"])
    ours = from_hf(stand_in, ctx).eval()
    ids = ref["ids"]
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100  # HF shifts inside; we take pre-shifted labels
    with torch.no_grad():
        logits = gather_full(ours(ids), ctx.tp_group, -1)[..., :VOCAB]
        loss = ours(ids, labels)
    d_logits, d_loss = max_dev(logits, ref["logits"]), abs(loss.item() - ref["loss"])
    # greedy generation with the KV cache, token for token
    got = generate(ours, ctx, ids[0, :5].tolist(), 14, greedy=True)
    if ctx.rank == 0:
        print(f"llama kv={ref['config'].num_key_value_heads} TP={ctx.tp_size}: logits "
              f"{d_logits:.2e}, loss {d_loss:.2e}, generated {got}")
    assert d_logits <= TOL and d_loss <= TOL, (d_logits, d_loss)
    assert got == ref["generated"]
    # and back: the HF state dict exported is the original, exactly
    back = full_state_to_hf(full_state_dict(ours, ctx.tp_group), ours.cfg)
    assert set(back) == set(ref["state"])
    for name, tensor in ref["state"].items():
        assert torch.equal(back[name], tensor), f"round trip changed {name}"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_llama_gqa_equals_transformers_and_round_trips(distributed, tp):
    """2 K/V heads for 4 query heads: split at TP 2, shared at TP 4 (TP > groups)."""
    ref = _reference(2, False, None)
    if tp > 1:
        distributed(_check_hf_parity, tp, ref)
        return
    _check_hf_parity(ParallelContext(), ref)  # in this process; and through transformers:
    hf = hf_llama(2, False, None)
    back = to_hf(from_hf(hf))
    assert isinstance(back, transformers.LlamaForCausalLM)
    assert back.config.num_key_value_heads == 2 and not back.config.tie_word_embeddings
    with torch.no_grad():
        assert max_dev(back(ref["ids"]).logits, ref["logits"]) == 0.0


def test_llama_mha_tied_linear_rope_equals_transformers():
    """One K/V head per query head (fused [Q|K|V]), tied head, linear rope scaling."""
    ref = _reference(4, True, {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})
    _check_hf_parity(ParallelContext(), ref)
    back = to_hf(from_hf(hf_llama(4, True, {"rope_type": "linear", "rope_theta": 500.0,
                                            "factor": 2.0})))
    assert back.config.tie_word_embeddings
    assert back.config.rope_parameters["rope_type"] == "linear"
    with torch.no_grad():
        assert max_dev(back(ref["ids"]).logits, ref["logits"]) == 0.0


def test_what_is_not_built_is_refused_in_one_line():
    from megatron_lite.models.hf import config_from_hf

    hf_cfg = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=4, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192})
    with pytest.raises(ValueError, match="rope scaling 'llama3' is not built"):
        config_from_hf(hf_cfg)
    with pytest.raises(ValueError, match="biases"):
        config_from_hf(transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                                attention_bias=True))
    cfg = Config()
    cfg.model = ModelConfig(num_attention_heads=4, hidden_size=32, position_embedding="rope",
                            rope_scaling="yarn", num_query_groups=3)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert "model.rope_scaling='yarn' is not built" in str(err.value)
    assert "model.num_query_groups=3 must divide model.num_attention_heads=4" in str(err.value)
    cfg.model = ModelConfig(num_attention_heads=8, hidden_size=64, num_query_groups=4,
                            rope_theta=5.0)
    cfg.parallel.tensor_parallel_size = 8
    with pytest.raises(ConfigError) as err:
        check_config(cfg, world_size=8)
    assert "model.rope_theta=5.0 needs model.position_embedding=rope" in str(err.value)
    cfg.model.rope_theta = 10000.0
    cfg.model.num_query_groups = 8
    cfg.parallel.tensor_parallel_size = 3
    with pytest.raises(ConfigError, match="K/V heads split over TP"):
        check_config(cfg, world_size=3)
    # a GPT with Llama parts but learned positions has no HF model
    m = build_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                vocab_size=VOCAB, normalization="rmsnorm"))
    with pytest.raises(ValueError, match="no HF model holds this one"):
        to_hf(m)


def test_generation_caches_kv_heads_once_per_group():
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                      seq_length=16, max_position_embeddings=16, hidden_dropout=0.0,
                      attention_dropout=0.0, make_vocab_size_divisible_by=8, **LLAMA)
    model = build_model(cfg).eval()
    cache = KVCache()
    with torch.no_grad():
        cached = model(torch.arange(6).view(1, 6), cache=cache)[:, -1]
        full = model(torch.arange(7).view(1, 7))[:, -1]
        step = model(torch.tensor([[6]]), cache=cache)[:, -1]
    k, v = cache.layers[0]
    assert k.shape == (1, 2, 7, 8) and v.shape == (1, 2, 7, 8)  # 2 groups, not 4 heads
    assert max_dev(step, full) < 1e-5 and cached.shape == step.shape
    assert torch.equal(F.softmax(step, -1).argmax(), F.softmax(full, -1).argmax())


# ---------------------------------------------------------------------------------------
# shapes of released models
# ---------------------------------------------------------------------------------------

# HF's LlamaForCausalLM of the released checkpoints (both tie the output layer)
PUBLISHED = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400}
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "llama"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_are_the_published_ones(name):
    from megatron_lite.memory import estimate_parameters
    from megatron_lite.models.hf import hf_config_from
    from megatron_lite.plan import count_parameters

    cfg = load_config(CONFIGS / f"{name}.yaml")
    check_config(cfg, world_size=cfg.parallel.tensor_parallel_size)
    ours = sum(p.numel() for p in build_model(cfg.model, device="meta").parameters())
    assert ours == PUBLISHED[name]  # the vocabularies need no padding at TP 1
    with torch.device("meta"):  # the independent implementation's count
        hf = transformers.LlamaForCausalLM(hf_config_from(cfg.model))
    assert sum(p.numel() for p in hf.parameters()) == ours
    for tp in (1, 8):  # the fit check's estimate, built nothing
        assert estimate_parameters(cfg.model, tp) == count_parameters(cfg, tp)["total"]
    untied = dataclasses.replace(cfg.model, untie_embeddings_and_output_weights=True)
    assert estimate_parameters(untied) == ours + cfg.model.vocab_size * cfg.model.hidden_size


def test_flops_count_the_llama_parts():
    """Per token forward: Q and output 4h^2, K and V 4h(g d), scores 4sh, SwiGLU 6h ffn,
    logits 2hV; x3 for forward + backward."""
    from megatron_lite.training.metrics import model_flops_per_step

    m = load_config(CONFIGS / "llama-3.2-1b.yaml").model
    h, s, g, d, ffn, v = 2048, m.seq_length, 8, 64, 8192, m.vocab_size
    per_token = 16 * (4 * h * h + 4 * h * g * d + 4 * s * h + 6 * h * ffn) + 2 * h * v
    assert model_flops_per_step(m, 2, s) == 3 * 2 * s * per_token


def test_llama_with_sequence_parallelism_matches_dense(distributed):
    """Sequence parallelism at TP 2 (K/V heads split): logits, loss, every gradient (the
    RMSNorm gains' summed over TP) and 3 AdamW steps equal the one-process model's."""
    distributed(_with_sp, 2, _check_against_dense, "gpt", LLAMA)
