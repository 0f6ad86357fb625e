"""Tokenizers built from files trained here (no downloads)."""

import json

import pytest

from megatron_lite.data.tokenizer import TokenizerError, build_tokenizer

TEXTS = ["Hello, world!  Two  spaces\tand a tab.\n", "Ünïcödé — “quotes” 😀 and 日本語",
         "def f(x):\n    return x ** 2  # code"]


def test_bpe_round_trip_and_eod(bpe_files):
    vocab, merges = bpe_files
    tok = build_tokenizer("GPT2BPETokenizer", str(vocab), str(merges))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    table = json.loads(vocab.read_text())
    assert tok.eod == table["<|endoftext|>"] and tok.vocab_size == len(table)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_wordpiece_specials(wordpiece_file):
    lines = wordpiece_file.read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = build_tokenizer("BertWordPieceLowerCase", str(wordpiece_file))
    assert tok.specials["[MASK]"] == 4 and tok.eod == 3 and tok.vocab_size == len(lines)
    ids = tok.encode("Return the VALUE of the attribute.")
    assert 2 not in ids and 3 not in ids  # no [CLS]/[SEP] added by encode
    assert tok.decode(ids).replace(" ##", "") == "return the value of the attribute."


def test_sentencepiece(tmp_path, stdlib_docs):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(stdlib_docs[:50]),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=500,
                                   model_type="bpe")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    assert tok.decode(tok.encode("Return the value.")) == "Return the value."
    assert tok.eod == 2 and tok.vocab_size == 500


@pytest.mark.parametrize("kwargs,message", [
    (dict(tokenizer_type="GPT2BPETokenizer"), "needs --vocab-file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="nope.json", merge_file="m.txt"),
     "--vocab-file nope.json: no such file"),
    (dict(tokenizer_type="BertWordPieceCase", vocab_file="x.txt"), "--vocab-file x.txt"),
    (dict(tokenizer_type="Llama"), "unknown tokenizer type 'Llama'"),
])
def test_errors_name_the_flag(kwargs, message):
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer(**kwargs)


def test_wordpiece_vocab_without_specials(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="missing special tokens"):
        build_tokenizer("BertWordPieceLowerCase", str(bad))
