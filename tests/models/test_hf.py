"""Hugging Face parity: transformers models (random configs, no downloads) converted both ways."""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.models.hf import from_hf, to_hf
from tests.distributed import gather_full, max_dev

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-4
VOCAB = 97  # odd on purpose: padded differently at every TP size


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32,
                                      vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cls_cfg, cls = {
            "bert": (transformers.BertConfig, transformers.BertForPreTraining),
            "megatron-bert": (transformers.MegatronBertConfig,
                              transformers.MegatronBertForPreTraining),
        }[kind]
        cfg = cls_cfg(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, vocab_size=VOCAB,
                      pad_token_id=0)
        model = cls(cfg)
    # random init leaves biases and LayerNorms at 0/1: perturb every tensor so the key
    # map is really exercised (a swapped bias would otherwise go unnoticed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _batch(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 10), generator=g)
    if kind == "gpt2":
        return ids, None, None
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    types = (torch.arange(10) >= 5).long().expand(2, 10).clone()
    return ids, types, mask


def _check_parity(ctx, kind: str) -> None:
    hf = _hf_model(kind)
    ours = from_hf(hf, ctx, hidden_dropout=0.0, attention_dropout=0.0).eval()
    ids, types, mask = _batch(kind)
    with torch.no_grad():
        if kind == "gpt2":
            ref = hf(input_ids=ids, labels=ids)
            labels = torch.roll(ids, -1, 1)
            labels[:, -1] = -100  # HF shifts inside; we take pre-shifted labels
            logits = ours(ids)
            loss = ours(ids, labels)
            ref_logits, ref_loss = ref.logits, ref.loss
        else:
            mlm = torch.full_like(ids, -100)
            mlm[:, ::3] = ids[:, ::3]
            nsp = torch.tensor([0, 1])
            ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
            logits, nsp_logits = ours(ids, types, mask)
            loss = ours(ids, types, mask, mlm_labels=mlm, nsp_labels=nsp)
            ref_logits = ref.prediction_logits
            ref_loss = (F.cross_entropy(ref_logits.view(-1, VOCAB), mlm.view(-1))
                        + F.cross_entropy(ref.seq_relationship_logits, nsp))
            assert max_dev(nsp_logits, ref.seq_relationship_logits) <= TOL
    full_logits = gather_full(logits, ctx.tp_group, -1)[..., :VOCAB]
    if mask is not None:  # padded query positions are meaningless in both models
        full_logits, ref_logits = full_logits[mask.bool()], ref_logits[mask.bool()]
    d_logits, d_loss = max_dev(full_logits, ref_logits), abs(loss.item() - ref_loss.item())
    if ctx.rank == 0:
        print(f"{kind} TP={ctx.tp_size}: logits {d_logits:.2e}, loss {d_loss:.2e}")
    assert d_logits <= TOL and d_loss <= TOL, (d_logits, d_loss)

    # and back: the exported HF state dict is the original, exactly
    back = to_hf(ours, ctx).state_dict()
    original = hf.state_dict()
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), f"round trip changed {name}"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["gpt2", "bert", "megatron-bert"])
def test_hf_parity_and_round_trip(distributed, kind, tp):
    distributed(_check_parity, tp, kind)


def test_a_config_json_that_is_not_json_names_the_file(tmp_path):
    from megatron_lite.models.hf import load_hf_model

    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_bytes(b'{"model_type": "gpt2\xff"}')
    with pytest.raises(ValueError) as err:
        load_hf_model(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'config.json'}: not a JSON object")
