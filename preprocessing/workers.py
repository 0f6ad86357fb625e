"""The prepare stage's tokenizer workers and the pool that runs them.

A worker takes a chunk of documents and returns, per document, its token sequences
(normalized text; one sequence per sentence with ``--split-sentences``) and, with dedup,
its shingles and MinHash signature. :class:`OrderedPool` runs chunks on ``workers``
spawned processes (in this process for one worker) with a bounded look-ahead and yields
the results in the order the chunks were submitted; :func:`preprocessing.stages.prepare`
feeds it.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass

import numpy as np

from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer
from preprocessing import dedup, lifeline
from preprocessing.normalize import normalize
from preprocessing.sentences import split_sentences


@dataclass
class Processed:
    """One document's token sequences, and for dedup its MinHash signature and shingles."""

    sequences: list[np.ndarray]
    num_tokens: int
    signature: np.ndarray | None = None
    shingles: np.ndarray | None = None


# --------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(recipe: dict, split: bool, append_eod: bool, with_dedup: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if mp.parent_process() is not None:  # a pool process: it dies with the run, and
        lifeline.hold(os.getppid())  # the run (not each worker) answers a Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(tokenizer=build_tokenizer(**recipe), split=split, append_eod=append_eod,
                   dedup=with_dedup)


# Most characters one tokenizer call is given: a huge document is tokenized in pieces, so
# the tokenizer's per-token bookkeeping (offsets, token strings: ~170 B a character in
# one call) is bounded by this, not by the document (bench/preprocess_memory.py)
PIECE_CHARS = 1 << 18
# tokenizers whose pre-tokenizer never joins the characters on the two sides of a single
# space between two non-space characters (GPT-2's byte-level regex; BERT's whitespace and
# punctuation split), so a text cut there tokenizes to the same ids as a whole
SPLITTABLE = ("GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase")


def _cut(text: str, lo: int, hi: int) -> int:
    """The last position in ``(lo, hi]`` of a space between two non-space characters
    (or, failing that, the first one after ``hi``); -1 when there is none."""
    pos = text.rfind(" ", lo + 1, hi + 1)
    while pos > lo and (text[pos - 1].isspace() or pos + 1 >= len(text)
                        or text[pos + 1].isspace()):
        pos = text.rfind(" ", lo + 1, pos)
    if pos > lo:
        return pos
    pos = text.find(" ", hi)
    while pos != -1 and (text[pos - 1].isspace() or pos + 1 >= len(text)
                         or text[pos + 1].isspace()):
        pos = text.find(" ", pos + 1)
    return pos


def text_pieces(text: str, kind: str, size: int | None = None) -> list[str]:
    """``text`` cut into pieces of about ``size`` (default :data:`PIECE_CHARS`) characters
    that tokenize to the ids of the whole (a tokenizer not in :data:`SPLITTABLE`: one
    piece)."""
    size = size or PIECE_CHARS
    if len(text) <= size or kind not in SPLITTABLE:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        cut = _cut(text, start + size // 2, start + size)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """The token ids of each text (int32), the tokenizer given at most about
    :data:`PIECE_CHARS` characters a call (:func:`text_pieces`)."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    batch: list[str] = []
    owner: list[int] = []
    chars = 0

    def flush():
        for i, ids in zip(owner, tok.encode_batch(batch), strict=True):
            parts[i].append(np.asarray(ids, dtype=np.int32))
        batch.clear()
        owner.clear()

    for i, text in enumerate(texts):
        for piece in text_pieces(text, tok.kind):
            if batch and chars + len(piece) > PIECE_CHARS:
                flush()
                chars = 0
            batch.append(piece)
            owner.append(i)
            chars += len(piece)
    if batch:
        flush()
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def _process_chunk(texts: list[str]) -> list[Processed]:
    tok: Tokenizer = _WORKER["tokenizer"]
    texts = [normalize(t) for t in texts]
    if _WORKER["split"]:
        per_doc = [split_sentences(t) for t in texts]
        ids = iter(encode_texts(tok, [s for doc in per_doc for s in doc]))
        docs = [[next(ids) for _ in doc] for doc in per_doc]
    else:
        docs = [[ids] for ids in encode_texts(tok, texts)]
    out = []
    for i, seqs in enumerate(docs):
        seqs = [s for s in seqs if s.size]
        if _WORKER["append_eod"]:
            eod = np.array([tok.eod], dtype=np.int32)
            seqs[-1:] = [np.concatenate([seqs[-1], eod]) if seqs else eod]
        item = Processed(seqs, sum(a.size for a in seqs))
        if _WORKER["dedup"]:
            shingles = dedup.shingle_hashes(texts[i])
            item.signature, item.shingles = dedup.minhash(shingles), dedup.as32(shingles)
        out.append(item)
        docs[i] = None  # a huge document's arrays are held once, by ``out``
    return out


class OrderedPool:
    """Run chunks on worker processes with bounded look-ahead, yielding results in order."""

    def __init__(self, workers: int, initargs: tuple):
        self.pool = None
        if workers > 1:
            self.pool = mp.get_context("spawn").Pool(workers, _init_worker, initargs)
        else:
            _init_worker(*initargs)
        self.window = collections.deque()
        self.limit = 4 * max(workers, 1)

    def submit(self, payload, texts: list[str]):
        """Queue a chunk; yields finished (payload, results) pairs, oldest first."""
        if self.pool is None:
            yield payload, _process_chunk(texts)
            return
        self.window.append((payload, self.pool.apply_async(_process_chunk, (texts,))))
        while len(self.window) > self.limit:
            payload, res = self.window.popleft()
            yield payload, res.get()

    def drain(self):
        while self.window:
            payload, res = self.window.popleft()
            yield payload, res.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


