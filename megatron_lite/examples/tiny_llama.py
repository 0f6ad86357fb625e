"""A small random Llama-shaped Hugging Face folder, for trying the Llama path offline.

    python -m megatron_lite.examples.tiny_llama --corpus corpus.jsonl --out DIR

Nothing downloads, so a released checkpoint (SmolLM2, TinyLlama, Llama 3.2) is stood in
for by what ``from_pretrained`` would read from one: ``config.json`` and
``model.safetensors`` of a randomly initialised ``LlamaForCausalLM`` (grouped-query
attention, untied head), and a ``tokenizer.json`` (byte-level BPE trained on
``--corpus``, a JSON-lines file of ``{"text": ...}``) with ``tokenizer_config.json``
naming its end-of-text token. ``python -m megatron_lite.convert --from-hf DIR`` reads
it as it would a released one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_lite.cli import run_cli
from megatron_lite.files import written_dir

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def write_tiny_llama(corpus: Path, out: Path, vocab_size: int = 8192, hidden: int = 128,
                     layers: int = 4, heads: int = 4, kv_heads: int = 2, ffn: int = 352,
                     max_positions: int = 256, seed: int = 0) -> Path:
    """Write the folder (atomically) and return it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_texts(corpus), trainer)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    model = transformers.LlamaForCausalLM(config)
    with written_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save(str(tmp / "tokenizer.json"))
        specials = {"bos_token": BOS, "eos_token": EOS}
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
             "model_max_length": max_positions}, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.examples.tiny_llama",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help='JSON lines of {"text": ...}')
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument("--vocab-size", type=int, default=8192)
    a = p.parse_args(argv)

    def body() -> None:
        if not a.corpus.is_file():
            raise ValueError(f"--corpus {a.corpus}: no such file")
        print(f"wrote {write_tiny_llama(a.corpus, a.out, a.vocab_size)}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
