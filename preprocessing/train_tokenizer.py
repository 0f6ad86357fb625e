"""Train a tokenizer on your corpus (no downloads).

    python -m preprocessing.train_tokenizer --input corpus.jsonl --type bpe \\
        --vocab-size 8192 --output-dir tok/

``bpe``: byte-level BPE, written GPT-2 style as ``vocab.json`` + ``merges.txt`` with
``<|endoftext|>``; load it with ``--tokenizer-type GPT2BPETokenizer``.
``wordpiece``: BERT WordPiece, written as ``vocab.txt`` starting with
[PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4); load it with ``BertWordPieceLowerCase`` (or
``BertWordPieceCase`` when trained with ``--cased``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from megatron_lite.data.tokenizer import BERT_SPECIALS, GPT2_EOD
from megatron_lite.files import publish
from preprocessing.normalize import normalize
from preprocessing.readers import InputError, expand_inputs, read_documents


def _texts(inputs: list[str], key: str):
    for rec in read_documents(expand_inputs(inputs), key):
        if not rec.error:
            yield normalize(rec.text)


def train(inputs: list[str], kind: str, vocab_size: int, output_dir: str | Path,
          key: str = "text", cased: bool = False, min_frequency: int = 2) -> list[Path]:
    """Train and write the tokenizer files atomically; returns their paths."""
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".train-") as tmp:
        if kind == "bpe":
            tok = ByteLevelBPETokenizer(add_prefix_space=False)
            tok.train_from_iterator(_texts(inputs, key), vocab_size=vocab_size,
                                    min_frequency=min_frequency, special_tokens=[GPT2_EOD],
                                    show_progress=False)
            names = ["vocab.json", "merges.txt"]
        elif kind == "wordpiece":
            tok = BertWordPieceTokenizer(lowercase=not cased)
            tok.train_from_iterator(_texts(inputs, key), vocab_size=vocab_size,
                                    min_frequency=min_frequency,
                                    special_tokens=list(BERT_SPECIALS), show_progress=False)
            names = ["vocab.txt"]
        else:
            raise InputError(f"--type {kind!r} is not one of bpe, wordpiece")
        tok.save_model(tmp)
        for name in names:
            publish(Path(tmp, name), out / name)
    return [out / n for n in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocessing.train_tokenizer",
                                description="Train byte-level BPE or WordPiece on a corpus.")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--type", required=True, choices=("bpe", "wordpiece"))
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--json-keys", default="text")
    p.add_argument("--cased", action="store_true", help="wordpiece: keep case")
    p.add_argument("--min-frequency", type=int, default=2)
    a = p.parse_args(argv)
    try:
        paths = train(a.input, a.type, a.vocab_size, a.output_dir, a.json_keys, a.cased,
                      a.min_frequency)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
