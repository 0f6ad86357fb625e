"""BERT samples on a real sentence shard: structure, masking and NSP statistics."""

import numpy as np

from megatron_lite.config import DataConfig
from megatron_lite.data.bert_dataset import BertDataset
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.tokenizer import build_tokenizer


def _dataset(shard, wordpiece_file, n=2000, wwm=False, seq=128):
    tok = build_tokenizer("BertWordPieceLowerCase", str(wordpiece_file))
    indexed = IndexedDataset(shard)
    cont = None
    if wwm:
        cont = np.zeros(tok.vocab_size, dtype=bool)
        for piece, i in tok.vocab().items():
            cont[i] = piece.startswith("##")
    return tok, BertDataset(indexed, (0, indexed.num_documents), seq, n, 1,
                            dict(tok.specials, vocab_size=tok.vocab_size),
                            DataConfig(whole_word_masking=wwm), continuation=cont)


def test_sample_structure(sentence_shard, wordpiece_file):
    tok, ds = _dataset(sentence_shard, wordpiece_file, n=200)
    cls, sep, pad = tok.specials["[CLS]"], tok.specials["[SEP]"], tok.specials["[PAD]"]
    for i in range(200):
        s = ds[i]
        n = int(s["attention_mask"].sum())
        ids = s["input_ids"]
        assert ids.shape == (128,) and ids[0] == cls and ids[n - 1] == sep
        assert (ids[n:] == pad).all() and (s["mlm_labels"][n:] == -100).all()
        labels_and_ids = np.where(s["mlm_labels"] >= 0, s["mlm_labels"], ids)
        seps = np.flatnonzero(labels_and_ids[:n] == sep)
        assert len(seps) == 2  # [CLS] A [SEP] B [SEP]
        types = s["token_type_ids"][:n]
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1:] == 1).all()
    assert all(np.array_equal(ds[7][k], ds[7][k]) for k in ds[7])  # deterministic


def test_masking_and_nsp_statistics(sentence_shard, wordpiece_file):
    tok, ds = _dataset(sentence_shard, wordpiece_file)
    specials = set(tok.specials.values())
    candidates = masked = as_mask = as_same = 0
    nsp = []
    for i in range(len(ds) if len(ds) < 2000 else 2000):
        s = ds[i]
        n = int(s["attention_mask"].sum())
        labels, ids = s["mlm_labels"][:n], s["input_ids"][:n]
        original = np.where(labels >= 0, labels, ids)
        candidates += sum(int(t) not in specials for t in original)
        picked = labels >= 0
        masked += int(picked.sum())
        as_mask += int((ids[picked] == tok.specials["[MASK]"]).sum())
        as_same += int((ids[picked] == labels[picked]).sum())
        nsp.append(int(s["nsp_labels"]))
    frac, mask_share, same_share = masked / candidates, as_mask / masked, as_same / masked
    print(f"masked {frac:.3f} of tokens; [MASK] {mask_share:.3f}, unchanged {same_share:.3f}, "
          f"random {1 - mask_share - same_share:.3f}; NSP random {np.mean(nsp):.3f}")
    assert abs(frac - 0.15) < 0.01
    assert abs(mask_share - 0.8) < 0.02 and abs(same_share - 0.1) < 0.02
    assert abs(np.mean(nsp) - 0.5) < 0.04


def test_whole_word_masking_masks_whole_words(sentence_shard, wordpiece_file):
    tok, ds = _dataset(sentence_shard, wordpiece_file, n=300, wwm=True)
    vocab = {i: p for p, i in tok.vocab().items()}
    for i in range(300):
        s = ds[i]
        labels = s["mlm_labels"]
        original = np.where(labels >= 0, labels, s["input_ids"])
        for pos in np.flatnonzero(labels >= 0):
            nxt = pos + 1
            if nxt < len(original) and vocab.get(int(original[nxt]), "").startswith("##"):
                assert labels[nxt] >= 0, "a word was masked without its continuation"
