"""BERT pretraining samples (masked LM + next-sentence prediction) over a sentence shard.

Follows google-research/bert's ``create_pretraining_data.py``, in Megatron's
index-based form:

* a *samples mapping* (built once per split, cached as ``.npy``) cuts each document
  into chunks of whole sentences, each aiming at ``seq_length - 3`` tokens or, with
  probability ``short_seq_prob``, at a random shorter target in [2, max];
* sample ``i`` (deterministic from ``seed + i``) splits its chunk at a random sentence
  into A and B; with probability 0.5 (always when the chunk has one sentence) B is
  replaced by sentences from a random other document (NSP label 1, "random"; 0 means
  "B follows A"); the pair is truncated from the longer side, front or back at random;
* ``[CLS] A [SEP] B [SEP]`` with segment ids 0 / 1, padded to ``seq_length``;
* 15 % of the non-special tokens (at most ``max_predictions_per_seq``) are predicted:
  80 % become [MASK], 10 % a random token, 10 % stay; with whole-word masking the
  WordPiece continuations (``##x``) of a chosen word are chosen with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_lite.config import DataConfig
from megatron_lite.data.gpt_dataset import ErrorSync, build_once, cache_key
from megatron_lite.data.indexed import IndexedDataError, IndexedDataset

MAPPING_VERSION = 1


def build_samples_mapping(indexed: IndexedDataset, doc_range: tuple[int, int],
                          max_tokens: int, num_samples: int, short_seq_prob: float,
                          seed: int) -> np.ndarray:
    """``[n, 4]`` int64 rows (first sentence, end sentence, target length, document)."""
    first, end = doc_range
    di, lengths = indexed.document_indices, indexed.sequence_lengths
    rows: list[tuple[int, int, int, int]] = []
    epoch = 0
    while len(rows) < num_samples:
        rng = np.random.RandomState((seed + 7919 * epoch) % 2**32)
        before = len(rows)
        for doc in range(first, end):
            s, stop = int(di[doc]), int(di[doc + 1])
            target = _target(rng, max_tokens, short_seq_prob)
            start, total = s, 0
            for sent in range(s, stop):
                total += int(lengths[sent])
                if total >= target or sent == stop - 1:
                    rows.append((start, sent + 1, target, doc))
                    start, total = sent + 1, 0
                    target = _target(rng, max_tokens, short_seq_prob)
        if len(rows) == before:
            raise IndexedDataError(f"{indexed.prefix}: no BERT samples in documents "
                                   f"[{first}, {end})")
        epoch += 1
    mapping = np.asarray(rows, dtype=np.int64)
    np.random.RandomState((seed + 1) % 2**32).shuffle(mapping)
    return mapping


def _target(rng: np.random.RandomState, max_tokens: int, short_seq_prob: float) -> int:
    if rng.random_sample() < short_seq_prob:
        return int(rng.randint(2, max_tokens + 1))
    return max_tokens


class BertDataset:
    """Padded BERT samples (dicts of int64 arrays) over one split of a sentence shard.

    Args:
        indexed: a ``_text_sentence`` shard (one sequence per sentence).
        doc_range: ``(first, end)`` documents of the split.
        seq_length: padded sample length (``[CLS] A [SEP] B [SEP]`` fits in it).
        num_samples: samples the run will read.
        seed: the same on every rank.
        tokens: special ids ``[CLS] [SEP] [MASK] [PAD]`` and ``vocab_size``.
        cfg: ``masked_lm_prob``, ``max_predictions_per_seq``, ``short_seq_prob``,
            ``whole_word_masking``.
        continuation: per vocab id, whether it continues a word (``##x``); for
            whole-word masking.
        build, sync: as for :class:`GPTDataset` (rank 0 builds the mapping).
    """

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], seq_length: int,
                 num_samples: int, seed: int, tokens: dict, cfg: DataConfig,
                 name: str = "train", continuation: np.ndarray | None = None,
                 build: bool = True, sync: ErrorSync | None = None):
        first, end = doc_range
        if end <= first:
            raise IndexedDataError(f"{indexed.prefix}: the {name} split has 0 documents "
                                   f"(data.split gives it none of {indexed.num_documents})")
        self.indexed, self.seq_length, self.seed = indexed, seq_length, seed
        self.cls, self.sep = tokens["[CLS]"], tokens["[SEP]"]
        self.mask, self.pad = tokens["[MASK]"], tokens["[PAD]"]
        self.vocab_size = tokens["vocab_size"]
        self.special = {self.cls, self.sep, self.mask, self.pad}
        self.doc_range = doc_range
        self.masked_lm_prob = cfg.masked_lm_prob
        self.max_predictions = cfg.max_predictions_per_seq or max(
            1, round(cfg.masked_lm_prob * seq_length))
        self.continuation = continuation if cfg.whole_word_masking else None
        max_tokens = seq_length - 3
        key = cache_key(indexed, MAPPING_VERSION, first, end, max_tokens, num_samples,
                        cfg.short_seq_prob, seed)
        path = Path(f"{indexed.prefix}.{name}.bert.{key}.npy")
        build_once([path], build, lambda: [build_samples_mapping(
            indexed, doc_range, max_tokens, num_samples, cfg.short_seq_prob, seed)], sync)
        self.mapping = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.mapping)

    def _sentences(self, lo: int, hi: int) -> list[np.ndarray]:
        return [self.indexed.get(s).astype(np.int64) for s in range(lo, hi)]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        lo, hi, target, doc = (int(x) for x in self.mapping[i % len(self.mapping)])
        rng = np.random.RandomState((self.seed + 104729 * i) % 2**32)
        sents = self._sentences(lo, hi)
        a_end = int(rng.randint(1, len(sents))) if len(sents) > 1 else 1
        a = np.concatenate(sents[:a_end])
        random_next = len(sents) == 1 or rng.random_sample() < 0.5
        if random_next:
            b = self._random_segment(rng, doc, max(target - a.size, 1))
        else:
            b = np.concatenate(sents[a_end:])
        a, b = self._truncate(rng, a, b, self.seq_length - 3)
        tokens = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]]).astype(np.int64)
        types = np.zeros(tokens.size, dtype=np.int64)
        types[a.size + 2:] = 1
        tokens, labels = self._mask(rng, tokens)
        n, pad = tokens.size, self.seq_length - tokens.size
        return {"input_ids": np.pad(tokens, (0, pad), constant_values=self.pad),
                "token_type_ids": np.pad(types, (0, pad)),
                "attention_mask": np.pad(np.ones(n, dtype=np.int64), (0, pad)),
                "mlm_labels": np.pad(labels, (0, pad), constant_values=-100),
                "nsp_labels": np.asarray(int(random_next), dtype=np.int64)}

    def _random_segment(self, rng, doc: int, want: int) -> np.ndarray:
        first, end = self.doc_range
        di = self.indexed.document_indices
        other = doc
        for _ in range(10):  # another, non-empty document (else fall back to this one)
            other = int(rng.randint(first, end))
            if other != doc and di[other + 1] > di[other]:
                break
        else:
            other = doc
        s, stop = int(di[other]), int(di[other + 1])
        if stop <= s:
            return np.zeros(0, dtype=np.int64)
        start = int(rng.randint(s, stop))
        out, total = [], 0
        for sent in range(start, stop):
            out.append(self.indexed.get(sent).astype(np.int64))
            total += out[-1].size
            if total >= want:
                break
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _truncate(rng, a: np.ndarray, b: np.ndarray, max_tokens: int):
        """Drop tokens from the longer segment, at its front or back at random."""
        a, b = list(a), list(b)
        while len(a) + len(b) > max_tokens:
            longer = a if len(a) > len(b) else b
            if rng.random_sample() < 0.5:
                del longer[0]
            else:
                longer.pop()
        return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)

    def _mask(self, rng, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        words: list[list[int]] = []
        for pos, tok in enumerate(tokens.tolist()):
            if tok in self.special:
                continue
            if self.continuation is not None and words and self.continuation[tok] \
                    and words[-1][-1] == pos - 1:
                words[-1].append(pos)
            else:
                words.append([pos])
        n_candidates = sum(len(w) for w in words)
        budget = min(self.max_predictions,
                     max(1, int(round(n_candidates * self.masked_lm_prob))))
        labels = np.full(tokens.size, -100, dtype=np.int64)
        out = tokens.copy()
        chosen = 0
        for k in rng.permutation(len(words)):
            word = words[k]
            if chosen + len(word) > budget:
                continue
            for pos in word:
                labels[pos] = tokens[pos]
                r = rng.random_sample()
                if r < 0.8:
                    out[pos] = self.mask
                elif r < 0.9:
                    out[pos] = rng.randint(0, self.vocab_size)
            chosen += len(word)
            if chosen >= budget:
                break
        return out, labels
