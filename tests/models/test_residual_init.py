"""model.scale_residual_init: the layers that write into the residual stream (attention's
output projection, the MLP's fc2) start at N(0, init_std / sqrt(2N)) (GPT-2, Megatron) or,
turned off, at N(0, init_std) like every other linear; the key survives a checkpoint."""

import math

import pytest
import torch

from megatron_lite.checkpoint import load_checkpoint, save_checkpoint
from megatron_lite.config import load_config
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext

LAYERS = 6
TINY = [f"model.num_layers={LAYERS}", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.seq_length=32", "model.max_position_embeddings=32", "model.vocab_size=500",
        "model.make_vocab_size_divisible_by=8", "model.init_std=0.02"]


def _pooled_std(model, suffixes: tuple[str, ...]) -> float:
    """The standard deviation of every weight whose name ends with one of ``suffixes``,
    pooled (measured, not read from the config)."""
    found = [p.detach().flatten() for n, p in model.named_parameters()
             if n.endswith(suffixes)]
    assert len(found) == LAYERS * len(suffixes), [n for n, _ in model.named_parameters()]
    return torch.cat(found).std().item()


RESIDUAL_OUT = ("attn.proj.weight", "mlp.fc2.weight")
RESIDUAL_IN = ("attn.qkv.weight", "mlp.fc1.weight")


@pytest.mark.parametrize("scale", [True, False])
def test_residual_output_layers_std(scale):
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, f"model.scale_residual_init={str(scale).lower()}"])
    model = build_model(cfg.model)
    expected = 0.02 / math.sqrt(2 * LAYERS) if scale else 0.02
    # ~123k weights pooled: the sample std is within ~0.3 % of the true one
    assert _pooled_std(model, RESIDUAL_OUT) == pytest.approx(expected, rel=0.03)
    assert _pooled_std(model, RESIDUAL_IN) == pytest.approx(0.02, rel=0.03)  # untouched


def test_default_is_the_gpt2_scaling():
    cfg = load_config(None, TINY)
    assert cfg.model.scale_residual_init is True
    assert cfg.model.residual_output_std == 0.02 / math.sqrt(2.0 * LAYERS)


def test_off_survives_a_checkpoint(tmp_path):
    cfg = load_config(None, [*TINY, "model.scale_residual_init=false"])
    model = build_model(cfg.model)
    ckpt = save_checkpoint(tmp_path, 1, model, ParallelContext(), cfg, {})
    back = load_config(ckpt / "config.yaml")
    assert back.model.scale_residual_init is False
    again = build_model(back.model)
    load_checkpoint(ckpt, again, ParallelContext())
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
