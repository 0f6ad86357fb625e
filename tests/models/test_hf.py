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


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny GPT-2 folder as transformers writes it (config.json, model.safetensors)."""
    folder = tmp_path / "hf"
    _hf_model("gpt2").save_pretrained(str(folder), safe_serialization=True)
    return folder


def _convert_error(hf_dir, out, capsys) -> str:
    from megatron_lite.convert import main as convert_main

    capsys.readouterr()
    assert convert_main(["--from-hf", str(hf_dir), "--to", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    assert not out.exists()  # refused before anything is written
    return err[len("error: "):]


def test_from_hf_refuses_bad_folders_in_one_line_before_allocating(hf_folder, tmp_path,
                                                                   capsys):
    """Each bad folder built here: a model too big for this machine (n_layer = 10^7: the
    planner's count, before any tensor) or of a negative width, a truncated
    model.safetensors, weights only as a pickle, a tokenizer.json that is not one, a
    config.json that is not UTF-8."""
    import json as json_

    from megatron_lite.convert import main as convert_main
    from megatron_lite.memory import estimate_parameters
    from megatron_lite.models.hf import config_from_hf, read_hf_config

    out = tmp_path / "ckpt"
    assert convert_main(["--from-hf", str(hf_folder), "--to", str(out)]) == 0  # it works
    out = tmp_path / "refused"

    big = tmp_path / "big"
    big.mkdir()
    config = json_.loads((hf_folder / "config.json").read_text())
    (big / "config.json").write_text(json_.dumps({**config, "n_layer": 10**7}))
    params = estimate_parameters(config_from_hf(read_hf_config(big)))
    err = _convert_error(big, out, capsys)
    assert err.startswith(f"{big / 'config.json'}: the model has about {params / 1e9:.3g}B "
                          "parameters: "
                          f"{params * 8 / 2**30:.1f} GiB of state"), err

    (big / "config.json").write_text(json_.dumps({**config, "n_embd": -32}))
    assert _convert_error(big, out, capsys).startswith(
        f"{big / 'config.json'}: model.hidden_size=-32 must be >= 1")

    weights = hf_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 1000])
    assert _convert_error(hf_folder, out, capsys).startswith(
        f"{weights}: truncated or damaged: its header places tensors up to byte {len(data)} "
        f"of a {len(data) - 1000}-byte file")
    weights.write_bytes(data[:5])
    assert _convert_error(hf_folder, out, capsys).startswith(
        f"{weights}: not a readable safetensors file")

    weights.unlink()
    pickled = hf_folder / "pytorch_model.bin"
    torch.save(_hf_model("gpt2").state_dict(), pickled)
    assert _convert_error(hf_folder, out, capsys).startswith(
        f"{pickled}: refused: only safetensors weights are read")
    pickled.unlink()
    weights.write_bytes(data)

    (hf_folder / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    assert _convert_error(hf_folder, out, capsys).startswith(
        f"{hf_folder / 'tokenizer.json'}: not a tokenizer the tokenizers library reads")
    (hf_folder / "tokenizer.json").unlink()

    (hf_folder / "config.json").write_bytes(b'{"model_type": "gpt2\xff"}')
    assert _convert_error(hf_folder, out, capsys).startswith(
        f"{hf_folder / 'config.json'}: not a JSON object")
