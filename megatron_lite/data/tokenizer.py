"""Tokenizers by Megatron's names, over the Rust ``tokenizers`` library and ``sentencepiece``.

- ``GPT2BPETokenizer``: byte-level BPE from GPT-2's ``vocab.json`` + ``merges.txt``;
  EOD = ``<|endoftext|>``.
- ``BertWordPieceLowerCase`` / ``BertWordPieceCase``: WordPiece from ``vocab.txt``
  (id = line number) with [PAD] [UNK] [CLS] [SEP] [MASK]; EOD = [SEP].
- ``SentencePieceTokenizer``: a ``.model`` file; EOD = its ``</s>`` (eos) id.
- ``HFTokenizer``: any Hugging Face ``tokenizer.json`` (GPT-2, GPT-NeoX, Llama-style),
  ``--tokenizer-model`` naming the file or its folder; EOD = the ``eos_token`` of the
  folder's ``tokenizer_config.json``, else a known end-of-text token of the vocabulary.

Used by preprocessing (encode) and by training (vocab size, special ids, decode).
Nothing is downloaded: every tokenizer is built from files you give.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_TYPES = ("GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase",
                   "SentencePieceTokenizer", "HFTokenizer")
# end-of-text tokens of common vocabularies, for an HFTokenizer without tokenizer_config.json
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
GPT2_EOD = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built from the given files."""


# how the files are named to the user: preprocessing's flags, or the config keys of
# train / evaluate / generate (``build_tokenizer(..., names=CONFIG_KEYS)``)
FLAGS = {"tokenizer_type": "--tokenizer-type", "vocab_file": "--vocab-file",
         "merge_file": "--merge-file", "tokenizer_model": "--tokenizer-model"}
CONFIG_KEYS = {k: f"data.{k}" for k in FLAGS}


def _need(path: str | None, flag: str, kind: str) -> Path:
    if not path:
        raise TokenizerError(f"{kind} needs {flag}")
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"{flag} {p}: no such file")
    return p


class Tokenizer:
    """A uniform face over the backends: ``encode_batch``, ``decode``, sizes and special ids.

    ``recipe`` holds the :func:`build_tokenizer` arguments that made it, so another
    process (a preprocessing worker) can build the same tokenizer from files.
    """

    def __init__(self, kind: str, backend, vocab_size: int, eod: int | None,
                 specials: dict[str, int] | None = None, recipe: dict | None = None):
        self.kind, self.backend = kind, backend
        self.vocab_size, self.eod = vocab_size, eod
        self.specials = specials or {}
        self.recipe = recipe or {}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added)."""
        if self.kind == "SentencePieceTokenizer":
            return self.backend.encode(texts)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "SentencePieceTokenizer":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def vocab(self) -> dict[str, int]:
        """Every piece and its id (WordPiece continuations start with ``##``)."""
        if self.kind == "SentencePieceTokenizer":
            return {self.backend.id_to_piece(i): i for i in range(self.vocab_size)}
        return self.backend.get_vocab()


def build_tokenizer(tokenizer_type: str, vocab_file: str | None = None,
                    merge_file: str | None = None,
                    tokenizer_model: str | None = None,
                    names: dict[str, str] = FLAGS) -> Tokenizer:
    """Build a tokenizer from files, by Megatron's ``--tokenizer-type`` name. ``names``:
    how messages name the files (:data:`FLAGS`, or :data:`CONFIG_KEYS` for a config).

    Raises:
        TokenizerError: unknown type, a missing flag or file, or a vocab without its
            special tokens; the message names the flag and the file.
    """
    recipe = dict(tokenizer_type=tokenizer_type, vocab_file=vocab_file, merge_file=merge_file,
                  tokenizer_model=tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        from tokenizers import ByteLevelBPETokenizer

        vocab = _need(vocab_file, names["vocab_file"], tokenizer_type)
        merges = _need(merge_file, names["merge_file"], tokenizer_type)
        try:
            table = json.loads(vocab.read_text(encoding="utf-8"))
            backend = ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=False)
        except Exception as err:  # json or tokenizers parse errors
            raise TokenizerError(f"{vocab} / {merges}: not a GPT-2 BPE vocab ({err})") from None
        if GPT2_EOD not in table:
            raise TokenizerError(f"{names['vocab_file']} {vocab}: has no {GPT2_EOD} token")
        tok = Tokenizer(tokenizer_type, backend, backend.get_vocab_size(), table[GPT2_EOD],
                        {GPT2_EOD: table[GPT2_EOD]}, recipe)
    elif tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        from tokenizers import BertWordPieceTokenizer

        vocab = _need(vocab_file, names["vocab_file"], tokenizer_type)
        lines = vocab.read_text(encoding="utf-8").splitlines()
        ids = {tok: i for i, tok in enumerate(lines)}
        missing = [t for t in BERT_SPECIALS if t not in ids]
        if missing:
            raise TokenizerError(f"{names['vocab_file']} {vocab}: missing special tokens "
                                 f"{missing}")
        backend = BertWordPieceTokenizer(str(vocab),
                                         lowercase=tokenizer_type == "BertWordPieceLowerCase")
        tok = Tokenizer(tokenizer_type, backend, len(lines), ids["[SEP]"],
                        {t: ids[t] for t in BERT_SPECIALS}, recipe)
    elif tokenizer_type == "SentencePieceTokenizer":
        import sentencepiece as spm

        model = _need(tokenizer_model, names["tokenizer_model"], tokenizer_type)
        try:
            backend = spm.SentencePieceProcessor(model_file=str(model))
        except Exception as err:
            raise TokenizerError(f"{names['tokenizer_model']} {model}: cannot load "
                                 f"({err})") from None
        eos = backend.eos_id()
        tok = Tokenizer(tokenizer_type, backend, backend.get_piece_size(),
                        eos if eos >= 0 else None, recipe=recipe)
    elif tokenizer_type == "HFTokenizer":
        tok = _hf_tokenizer(tokenizer_model, recipe, names)
    else:
        raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r} "
                             f"(one of {', '.join(TOKENIZER_TYPES)})")
    return tok


def _hf_tokenizer(tokenizer_model: str | None, recipe: dict,
                  names: dict[str, str] = FLAGS) -> Tokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library (see the module docstring)."""
    from tokenizers import Tokenizer as Backend

    path = Path(tokenizer_model or "")
    if path.is_dir():
        path = path / "tokenizer.json"
    path = _need(str(path) if tokenizer_model else None, names["tokenizer_model"],
                 "HFTokenizer")
    try:
        backend = Backend.from_file(str(path))
    except Exception as err:
        raise TokenizerError(f"{names['tokenizer_model']} {path}: not a tokenizer.json "
                             f"({err})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    eos = None
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{config}: invalid JSON ({err.msg})") from None
        eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos not in vocab:
        eos = next((name for name in EOD_NAMES if name in vocab), None)
    eod = vocab[eos] if eos is not None else None
    return Tokenizer("HFTokenizer", backend, backend.get_vocab_size(with_added_tokens=True), eod,
                     {eos: eod} if eos is not None else {}, recipe)
