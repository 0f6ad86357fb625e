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


def _process_chunk(texts: list[str]) -> list[Processed]:
    tok: Tokenizer = _WORKER["tokenizer"]
    texts = [normalize(t) for t in texts]
    if _WORKER["split"]:
        per_doc = [split_sentences(t) for t in texts]
        flat = [s for doc in per_doc for s in doc]
        ids = iter(tok.encode_batch(flat) if flat else [])
        docs = [[next(ids) for _ in doc] for doc in per_doc]
    else:
        docs = [[ids] for ids in tok.encode_batch(texts)]
    out = []
    for text, seqs in zip(texts, docs, strict=True):
        seqs = [s for s in seqs if s]
        if _WORKER["append_eod"]:
            if seqs:
                seqs[-1] = seqs[-1] + [tok.eod]
            else:
                seqs = [[tok.eod]]
        arrays = [np.asarray(s, dtype=np.int64) for s in seqs]
        item = Processed(arrays, sum(a.size for a in arrays))
        if _WORKER["dedup"]:
            shingles = dedup.shingle_hashes(text)
            item.signature, item.shingles = dedup.minhash(shingles), dedup.as32(shingles)
        out.append(item)
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


