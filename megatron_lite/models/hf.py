"""Hugging Face interop: GPT-2, BERT and Llama weights to and from megatron-lite, at any TP size.

Conversion is a key map over *full* state dicts; sharding is done by
:func:`load_full_state_dict` / :func:`full_state_dict`, so it works for every TP size.

- GPT-2 (``GPT2LMHeadModel``): HF's ``Conv1D`` stores weights transposed ([in, out]);
  ``c_attn`` is ``[Q|K|V]`` along the output dim, which is exactly our fused QKV
  layout; GELU is the tanh approximation; the LM head is tied to ``wte``.
- BERT post-LN = ``BertForPreTraining``; pre-LN = ``MegatronBertForPreTraining``. HF
  keeps separate query/key/value linears; we fuse them as ``[Q|K|V]``.
- Llama (``LlamaForCausalLM``) = a GPT with rotary positions, RMSNorm, SwiGLU, no
  biases and grouped-query attention (:func:`is_llama`). ``q_proj``/``k_proj``/``v_proj``
  are our ``q``/``k``/``v`` (fused ``[Q|K|V]`` when there is one K/V head per query head);
  ``gate_proj`` and ``up_proj`` are our fused ``fc1 = [gate|up]``. HF's rows are already
  in the half-split rotary layout ours uses (``rotate_half``), so Q/K rows are copied
  unpermuted (:mod:`megatron_lite.models.rotary`).

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


def is_llama(cfg: ModelConfig) -> bool:
    """A GPT whose parts make it a Llama-family decoder (rotary positions)."""
    return cfg.arch == "gpt" and cfg.position_embedding == "rope"


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    wanted = {"normalization": "rmsnorm", "activation": "swiglu", "add_bias_linear": False,
              "layernorm_order": "pre"}
    differ = [f"model.{k}={getattr(cfg, k)}" for k, v in wanted.items() if getattr(cfg, k) != v]
    if differ:
        raise ValueError(f"rotary positions with {', '.join(differ)}: Hugging Face's Llama has "
                         "RMSNorm, SwiGLU, no biases and pre-norm, so no HF model holds this one")
    grouped = cfg.query_groups != cfg.num_attention_heads
    rules = [("wte.weight", "model.embed_tokens.weight", "vocab")]
    for i in range(cfg.num_layers):
        a, f, L = f"transformer.layers.{2 * i}", f"transformer.layers.{2 * i + 1}", \
            f"model.layers.{i}"
        rules.append((f"{a}.ln.weight", f"{L}.input_layernorm.weight", "copy"))
        if grouped:
            rules += [(f"{a}.attn.{n}.weight", f"{L}.self_attn.{n}_proj.weight", "copy")
                      for n in "qkv"]
        else:
            rules.append((f"{a}.attn.qkv.weight", f"{L}.self_attn.{{q,k,v}}_proj.weight", "cat"))
        rules += [(f"{a}.attn.proj.weight", f"{L}.self_attn.o_proj.weight", "copy"),
                  (f"{f}.ln.weight", f"{L}.post_attention_layernorm.weight", "copy"),
                  (f"{f}.mlp.fc1.weight", f"{L}.mlp.{{gate,up}}_proj.weight", "cat"),
                  (f"{f}.mlp.fc2.weight", f"{L}.mlp.down_proj.weight", "copy")]
    rules.append(("transformer.final_ln.weight", "model.norm.weight", "copy"))
    head = "output_layer.weight" if cfg.untie_embeddings_and_output_weights else "wte.weight"
    rules.append((head, "lm_head.weight", "vocab"))  # tied: wte again
    return rules


def _cat_names(theirs: str) -> list[str]:
    """``a.{q,k,v}_proj.w`` -> the three names (a ``cat`` rule's HF tensors, in order)."""
    head, rest = theirs.split("{", 1)
    names, tail = rest.split("}", 1)
    return [f"{head}{n}{tail}" for n in names.split(",")]


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
    if cfg.kept_layers is not None:
        raise ValueError(f"model.layers_to_keep={cfg.layers_to_keep!r}: write the pruned "
                         "checkpoint first (python -m megatron_lite.prune), then convert it")
    if is_llama(cfg):
        return _llama_rules(cfg)
    if cfg.position_embedding != "learned":
        raise ValueError(f"model.position_embedding={cfg.position_embedding}: Hugging Face's "
                         "GPT-2 has learned absolute positions only (transformers no longer "
                         "ships Transformer-XL), so no HF model holds this one")
    plain = {"normalization": "layernorm", "add_bias_linear": True,
             "untie_embeddings_and_output_weights": False, "query_groups": cfg.num_attention_heads}
    differ = [f"model.{k}={getattr(cfg, k)}" for k, v in plain.items() if getattr(cfg, k) != v]
    if cfg.activation == "swiglu":
        differ.append("model.activation=swiglu")
    if differ:
        raise ValueError(f"learned positions with {', '.join(differ)}: Hugging Face's GPT-2 "
                         "and BERT hold none of these (a Llama has rotary positions), so no "
                         "HF model holds this one")
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
        elif how == "cat":
            out[ours] = torch.cat([hf_state[n] for n in _cat_names(theirs)])
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
        elif how == "cat":
            names = _cat_names(theirs)
            for name, part in zip(names, t.chunk(len(names)), strict=True):
                out[name] = part.clone()
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
    """A :class:`ModelConfig` for an HF ``GPT2Config``, ``BertConfig``, ``MegatronBertConfig``
    or ``LlamaConfig`` (what is not built, e.g. rope scalings other than linear, is one
    ``ValueError``)."""
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
    if kind == "llama":
        return _llama_config(hf_config)
    raise ValueError(f"HF model type {kind!r} is not supported (gpt2, bert, megatron-bert, "
                     "llama)")


def _llama_rope(hf_config) -> tuple[float, str, float]:
    """``(rope_theta, rope_scaling, factor)`` of a Llama config (transformers 5's
    ``rope_parameters``, or 4's ``rope_theta`` + ``rope_scaling``); a scaling that is not
    built is one error."""
    params = dict(getattr(hf_config, "rope_parameters", None)
                  or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), "none", 1.0
    if kind == "linear":
        return float(theta), "linear", float(params["factor"])
    raise ValueError(f"Llama rope scaling {kind!r} is not built (default, linear)")


def _llama_config(hf_config) -> ModelConfig:
    c = hf_config
    heads, hidden = c.num_attention_heads, c.hidden_size
    refused = [(c.hidden_act != "silu", f"activation {c.hidden_act!r} (silu only)"),
               (getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False),
                "attention/MLP biases"),
               ((getattr(c, "head_dim", None) or hidden // heads) * heads != hidden,
                f"head_dim {getattr(c, 'head_dim', None)} != hidden_size / heads"),
               (getattr(c, "sliding_window", None) is not None, "sliding-window attention")]
    for bad, what in refused:
        if bad:
            raise ValueError(f"Llama with {what} is not built")
    theta, scaling, factor = _llama_rope(c)
    groups = c.num_key_value_heads or heads
    return ModelConfig(
        arch="gpt", num_layers=c.num_hidden_layers, hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=0 if groups == heads else groups,
        ffn_hidden_size=c.intermediate_size, seq_length=c.max_position_embeddings,
        max_position_embeddings=c.max_position_embeddings, vocab_size=c.vocab_size,
        layernorm_epsilon=c.rms_norm_eps, hidden_dropout=0.0,
        attention_dropout=float(c.attention_dropout or 0.0), init_std=c.initializer_range,
        normalization="rmsnorm", activation="swiglu", position_embedding="rope",
        rope_theta=theta, rope_scaling=scaling, rope_scaling_factor=factor,
        add_bias_linear=False, layernorm_order="pre",
        untie_embeddings_and_output_weights=not c.tie_word_embeddings)


def hf_config_from(cfg: ModelConfig, eos_token_id: int | None = None,
                   pad_token_id: int | None = None):
    """The HF config object matching a :class:`ModelConfig`.

    Args:
        eos_token_id: GPT-2's end-of-text id (its ``bos`` and ``eos``), from the
            tokenizer; None names none (a vocabulary's last id is not always it: a
            tokenizer trained by ``preprocessing.train_tokenizer`` has it at 0).
    """
    import transformers

    if is_llama(cfg):
        _llama_rules(cfg)  # refuses a combination no HF model holds
        rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling == "linear":
            rope["factor"] = cfg.rope_scaling_factor
        return transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.query_groups, hidden_act="silu",
            max_position_embeddings=cfg.max_position_embeddings,
            initializer_range=cfg.init_std, rms_norm_eps=cfg.layernorm_epsilon,
            tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
            rope_parameters=rope, attention_bias=False, mlp_bias=False,
            attention_dropout=cfg.attention_dropout, bos_token_id=None,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id)
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
        hf_model: ``GPT2LMHeadModel``, ``BertForPreTraining``, ``MegatronBertForPreTraining``
            or ``LlamaForCausalLM``.
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
    if is_llama(cfg):
        hf_cls = transformers.LlamaForCausalLM
    elif cfg.arch == "gpt":
        hf_cls = transformers.GPT2LMHeadModel
    elif cfg.layernorm_order == "post":
        hf_cls = transformers.BertForPreTraining
    else:
        hf_cls = transformers.MegatronBertForPreTraining
    hf_model = hf_cls(hf_config)
    hf_state = full_state_to_hf(full_state_dict(model, ctx.tp_group), cfg)
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "masked_bias", "attn.bias",
                                                      "rotary_emb.inv_freq"))]
    if missing or unexpected:
        raise KeyError(f"HF export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf_model.eval()


_HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "bert": "BertForPreTraining",
               "megatron-bert": "MegatronBertForPreTraining", "llama": "LlamaForCausalLM"}
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
                         "(gpt2, bert, megatron-bert, llama)")
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
    """A local Hugging Face model folder (GPT-2, BERT, Megatron-BERT, Llama) as a
    transformers model in eval mode; offline, safetensors only, one-line errors naming the file.

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
