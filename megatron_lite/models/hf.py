"""Hugging Face interop: GPT-2 and BERT weights to and from megatron-lite, at any TP size.

Conversion is a key map over *full* state dicts; sharding is done by
:func:`load_full_state_dict` / :func:`full_state_dict`, so it works for every TP size.

- GPT-2 (``GPT2LMHeadModel``): HF's ``Conv1D`` stores weights transposed ([in, out]);
  ``c_attn`` is ``[Q|K|V]`` along the output dim, which is exactly our fused QKV
  layout; GELU is the tanh approximation; the LM head is tied to ``wte``.
- BERT post-LN = ``BertForPreTraining``; pre-LN = ``MegatronBertForPreTraining``. HF
  keeps separate query/key/value linears; we fuse them as ``[Q|K|V]``.

The vocab is padded inside megatron-lite (to 128 x TP) and trimmed on export.
``transformers`` is imported lazily: it is the optional ``hf`` extra.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.models import BertModel, GPTModel, build_model
from megatron_lite.parallel import ParallelContext, full_state_dict, load_full_state_dict

# (our name, HF name, how): "copy", "T" (Conv1D transpose), "vocab" (trim on export)
Rule = tuple[str, str, str]


def _gpt_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [("wte.weight", "transformer.wte.weight", "vocab"),
             ("wpe.weight", "transformer.wpe.weight", "copy")]
    for i in range(cfg.num_layers):
        a, f, h = f"transformer.layers.{2 * i}", f"transformer.layers.{2 * i + 1}", \
            f"transformer.h.{i}"
        for ours, theirs in ((f"{a}.ln", f"{h}.ln_1"), (f"{f}.ln", f"{h}.ln_2")):
            rules += [(f"{ours}.weight", f"{theirs}.weight", "copy"),
                      (f"{ours}.bias", f"{theirs}.bias", "copy")]
        for ours, theirs in ((f"{a}.attn.qkv", f"{h}.attn.c_attn"),
                             (f"{a}.attn.proj", f"{h}.attn.c_proj"),
                             (f"{f}.mlp.fc1", f"{h}.mlp.c_fc"),
                             (f"{f}.mlp.fc2", f"{h}.mlp.c_proj")):
            rules += [(f"{ours}.weight", f"{theirs}.weight", "T"),
                      (f"{ours}.bias", f"{theirs}.bias", "copy")]
    rules += [("transformer.final_ln.weight", "transformer.ln_f.weight", "copy"),
              ("transformer.final_ln.bias", "transformer.ln_f.bias", "copy"),
              ("wte.weight", "lm_head.weight", "vocab")]  # tied
    return rules


def _linear_rules(ours: str, theirs: str) -> list[Rule]:
    """Copy rules for a module's ``weight`` and ``bias`` (a Linear or a LayerNorm)."""
    return [(f"{ours}.weight", f"{theirs}.weight", "copy"),
            (f"{ours}.bias", f"{theirs}.bias", "copy")]


def _bert_rules(cfg: ModelConfig) -> list[Rule]:
    post = cfg.layernorm_order == "post"
    e = "bert.embeddings"
    rules = [("word.weight", f"{e}.word_embeddings.weight", "vocab"),
             ("position.weight", f"{e}.position_embeddings.weight", "copy"),
             ("tokentype.weight", f"{e}.token_type_embeddings.weight", "copy")]
    if post:
        rules += _linear_rules("embed_ln", f"{e}.LayerNorm")
    for i in range(cfg.num_layers):
        a, f, L = f"transformer.layers.{2 * i}", f"transformer.layers.{2 * i + 1}", \
            f"bert.encoder.layer.{i}"
        rules += [(f"{a}.attn.qkv.weight", f"{L}.attention.self.{{q,k,v}}.weight", "qkv"),
                  (f"{a}.attn.qkv.bias", f"{L}.attention.self.{{q,k,v}}.bias", "qkv")]
        rules += _linear_rules(f"{a}.attn.proj", f"{L}.attention.output.dense")
        rules += _linear_rules(f"{f}.mlp.fc1", f"{L}.intermediate.dense")
        rules += _linear_rules(f"{f}.mlp.fc2", f"{L}.output.dense")
        if post:
            rules += _linear_rules(f"{a}.ln", f"{L}.attention.output.LayerNorm")
            rules += _linear_rules(f"{f}.ln", f"{L}.output.LayerNorm")
        else:
            rules += _linear_rules(f"{a}.ln", f"{L}.attention.ln")
            rules += _linear_rules(f"{f}.ln", f"{L}.ln")
    if not post:
        rules += _linear_rules("transformer.final_ln", "bert.encoder.ln")
    rules += _linear_rules("pooler", "bert.pooler.dense")
    rules += _linear_rules("lm_dense", "cls.predictions.transform.dense")
    rules += _linear_rules("lm_ln", "cls.predictions.transform.LayerNorm")
    rules += [("lm_bias", "cls.predictions.bias", "vocab"),
              ("lm_bias", "cls.predictions.decoder.bias", "vocab"),  # tied
              ("word.weight", "cls.predictions.decoder.weight", "vocab")]  # tied
    rules += _linear_rules("nsp", "cls.seq_relationship")
    return rules


def _rules(cfg: ModelConfig) -> list[Rule]:
    if cfg.pattern != "sf" * cfg.num_layers:
        raise ValueError(f"the sublayer pattern {cfg.pattern!r} is not (sf)^{cfg.num_layers}: "
                         "Hugging Face's GPT-2 and BERT have an attention and a feed-forward "
                         "sublayer in every layer, so no HF model holds it")
    if cfg.position_embedding != "learned":
        raise ValueError(f"model.position_embedding={cfg.position_embedding}: Hugging Face's "
                         "GPT-2 has learned absolute positions only (transformers no longer "
                         "ships Transformer-XL), so no HF model holds this one")
    if cfg.kept_layers is not None:
        raise ValueError(f"model.layers_to_keep={cfg.layers_to_keep!r}: write the pruned "
                         "checkpoint first (python -m megatron_lite.prune), then convert it")
    return _gpt_rules(cfg) if cfg.arch == "gpt" else _bert_rules(cfg)


_QKV = ("query", "key", "value")


def hf_to_full_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict:
    """An HF state dict as a full megatron-lite state dict (vocab unpadded)."""
    out = {}
    for ours, theirs, how in _rules(cfg):
        if ours in out:  # tied weights appear twice in HF
            continue
        if how == "qkv":
            out[ours] = torch.cat([hf_state[theirs.replace("{q,k,v}", n)] for n in _QKV])
        elif how == "T":
            out[ours] = hf_state[theirs].t().contiguous()
        else:
            out[ours] = hf_state[theirs].clone()
    return out


def full_state_to_hf(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict:
    """A full megatron-lite state dict as an HF state dict (vocab trimmed)."""
    out = {}
    for ours, theirs, how in _rules(cfg):
        t = full[ours]
        if how == "qkv":
            for name, part in zip(_QKV, t.chunk(3), strict=True):
                out[theirs.replace("{q,k,v}", name)] = part.clone()
        elif how == "T":
            out[theirs] = t.t().contiguous()
        elif how == "vocab":
            out[theirs] = t[: cfg.vocab_size].clone()
        else:
            out[theirs] = t.clone()
    return out


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

_GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf_config) -> ModelConfig:
    """A :class:`ModelConfig` for an HF ``GPT2Config``, ``BertConfig`` or ``MegatronBertConfig``."""
    kind = hf_config.model_type
    if kind == "gpt2":
        act = hf_config.activation_function
        if act not in _GELU:
            raise ValueError(f"GPT-2 activation {act!r} is not supported")
        return ModelConfig(
            arch="gpt", num_layers=hf_config.n_layer, hidden_size=hf_config.n_embd,
            num_attention_heads=hf_config.n_head,
            ffn_hidden_size=hf_config.n_inner or 4 * hf_config.n_embd,
            seq_length=hf_config.n_positions, max_position_embeddings=hf_config.n_positions,
            vocab_size=hf_config.vocab_size, layernorm_epsilon=hf_config.layer_norm_epsilon,
            hidden_dropout=hf_config.resid_pdrop, attention_dropout=hf_config.attn_pdrop,
            init_std=hf_config.initializer_range, activation=_GELU[act], layernorm_order="pre")
    if kind in ("bert", "megatron-bert"):
        act = hf_config.hidden_act
        if act not in _GELU:
            raise ValueError(f"BERT activation {act!r} is not supported")
        return ModelConfig(
            arch="bert", num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            ffn_hidden_size=hf_config.intermediate_size,
            seq_length=hf_config.max_position_embeddings,
            max_position_embeddings=hf_config.max_position_embeddings,
            vocab_size=hf_config.vocab_size, num_tokentypes=hf_config.type_vocab_size,
            layernorm_epsilon=hf_config.layer_norm_eps,
            hidden_dropout=hf_config.hidden_dropout_prob,
            attention_dropout=hf_config.attention_probs_dropout_prob,
            init_std=hf_config.initializer_range, activation=_GELU[act],
            layernorm_order="pre" if kind == "megatron-bert" else "post")
    raise ValueError(f"HF model type {kind!r} is not supported (gpt2, bert, megatron-bert)")


def hf_config_from(cfg: ModelConfig, eos_token_id: int | None = None,
                   pad_token_id: int | None = None):
    """The HF config object matching a :class:`ModelConfig`.

    Args:
        eos_token_id: GPT-2's end-of-text id (its ``bos`` and ``eos``), from the
            tokenizer; None names none (a vocabulary's last id is not always it: a
            tokenizer trained by ``preprocessing.train_tokenizer`` has it at 0).
    """
    import transformers

    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
    if cfg.arch == "gpt":
        if cfg.layernorm_order != "pre":
            raise ValueError("GPT-2 in HF is pre-LN only")
        return transformers.GPT2Config(
            n_layer=cfg.num_layers, n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads,
            n_inner=cfg.ffn_size, n_positions=cfg.max_position_embeddings,
            vocab_size=cfg.vocab_size, layer_norm_epsilon=cfg.layernorm_epsilon,
            resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
            attn_pdrop=cfg.attention_dropout, initializer_range=cfg.init_std,
            activation_function=act, tie_word_embeddings=True,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    config_cls = (transformers.BertConfig if cfg.layernorm_order == "post"
                  else transformers.MegatronBertConfig)
    return config_cls(
        num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.ffn_size,
        max_position_embeddings=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
        type_vocab_size=cfg.num_tokentypes, layer_norm_eps=cfg.layernorm_epsilon,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.init_std, hidden_act=act, tie_word_embeddings=True,
        pad_token_id=0 if pad_token_id is None else pad_token_id)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def from_hf(hf_model, ctx: ParallelContext | None = None, **overrides) -> GPTModel | BertModel:
    """Build a megatron-lite model at ``ctx``'s TP size holding an HF model's weights.

    Args:
        hf_model: ``GPT2LMHeadModel``, ``BertForPreTraining`` or ``MegatronBertForPreTraining``.
        ctx: the parallel context; every TP rank calls this with the same HF model.
        **overrides: ModelConfig fields to change (e.g. ``hidden_dropout=0.0``).
    """
    ctx = ctx or ParallelContext()
    cfg = dataclasses.replace(config_from_hf(hf_model.config), **overrides)
    model = build_model(cfg, ctx)
    load_full_state_dict(model, hf_to_full_state(hf_model.state_dict(), cfg), ctx.tp_group)
    return model


def to_hf(model: GPTModel | BertModel, ctx: ParallelContext | None = None,
          eos_token_id: int | None = None, pad_token_id: int | None = None):
    """The equivalent HF model (built on every rank; collective over the TP group).

    Args:
        eos_token_id: the tokenizer's end-of-text id, for GPT-2's config.
        pad_token_id: the tokenizer's padding id ([PAD] for BERT).
    """
    import transformers

    ctx = ctx or ParallelContext()
    cfg = model.cfg
    hf_config = hf_config_from(cfg, eos_token_id, pad_token_id)
    if cfg.arch == "gpt":
        hf_cls = transformers.GPT2LMHeadModel
    elif cfg.layernorm_order == "post":
        hf_cls = transformers.BertForPreTraining
    else:
        hf_cls = transformers.MegatronBertForPreTraining
    hf_model = hf_cls(hf_config)
    hf_state = full_state_to_hf(full_state_dict(model, ctx.tp_group), cfg)
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "masked_bias", "attn.bias"))]
    if missing or unexpected:
        raise KeyError(f"HF export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf_model.eval()


_HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "bert": "BertForPreTraining",
               "megatron-bert": "MegatronBertForPreTraining"}
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
            "flax_model.msgpack", "model.ckpt.index")


def read_hf_config(hf_dir: str | Path):
    """The ``transformers`` config object of a local HF model folder (nothing else is
    read): one-line errors naming ``config.json``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no config.json (a local Hugging Face model folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kind = data.get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError) as err:
        raise ValueError(f"{path}: not a JSON object ({err})") from None
    if kind not in _HF_CLASSES:
        raise ValueError(f"{hf_dir}: model_type {kind!r} is not supported "
                         "(gpt2, bert, megatron-bert)")
    cls = getattr(transformers, _HF_CLASSES[kind])
    try:
        return cls.config_class.from_dict(data)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a {kind} config ({err})") from None


def check_safetensors(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header does not parse or whose tensors do not
    fit its size (a truncated download or copy), in one line naming it; reads only the
    header."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"a header of {n} bytes")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}; {size} bytes)"
                         ) from None
    if 8 + n + end != size:
        raise ValueError(f"{path}: truncated or damaged: its header places tensors up to byte "
                         f"{8 + n + end} of a {size}-byte file")


def hf_weight_files(hf_dir: str | Path) -> list[Path]:
    """The safetensors weights of a local HF folder, each checked
    (:func:`check_safetensors`). Pickled weights (``pytorch_model.bin``) are never read:
    a folder that has only those is one line naming the file (weights_only safety)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                               .values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
        files = [hf_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index} names {f.name}, which is missing")
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    else:
        pickled = [hf_dir / n for n in _PICKLES if (hf_dir / n).is_file()]
        if pickled:
            raise ValueError(f"{pickled[0]}: refused: only safetensors weights are read (a "
                             "pickled checkpoint can run code when loaded); convert it with "
                             "transformers where you trust it (save_pretrained(..., "
                             "safe_serialization=True))")
        raise ValueError(f"{hf_dir}: no model.safetensors")
    for f in files:
        check_safetensors(f)
    return files


def load_hf_model(hf_dir: str | Path, hf_config=None):
    """A local Hugging Face model folder (GPT-2, BERT, Megatron-BERT) as a transformers
    model in eval mode; offline, safetensors only, one-line errors naming the file.

    Args:
        hf_config: its config (:func:`read_hf_config`), when already read.
    """
    import transformers

    hf_dir = Path(hf_dir)
    hf_config = hf_config if hf_config is not None else read_hf_config(hf_dir)
    hf_weight_files(hf_dir)
    cls = getattr(transformers, _HF_CLASSES[hf_config.model_type])
    return cls.from_pretrained(str(hf_dir), config=hf_config, local_files_only=True,
                               use_safetensors=True).eval()
