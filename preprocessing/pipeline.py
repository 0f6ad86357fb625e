"""The preprocessing pipeline: read -> normalize -> tokenize -> filter -> dedup -> shards.

The work runs as the stages of :mod:`preprocessing.stages` (prepare, candidates, verify,
components, write, finalize) on an executor (:mod:`preprocessing.executors`): without
``--executor``, one task per stage in this process, with ``--workers`` tokenizer
processes; with ``--executor local|slurm``, ``--tasks`` shards on datatrove's executors.
The output is byte-identical for any executor, task and worker count. This module holds
the options and the tokenizer workers the prepare stage uses.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer
from preprocessing import dedup
from preprocessing.sentences import split_sentences

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalize(text: str) -> str:
    """Unicode NFC, control characters removed (newlines and tabs kept)."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


@dataclass
class Options:
    inputs: list[str]
    output_prefix: str
    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    txt_docs: str = "file"  # a .txt file is one document, or one per blank-line block
    append_eod: bool = False
    split_sentences: bool = False
    min_tokens: int = 128
    dedup_threshold: float = 0.7
    dedup: bool = True
    workers: int = 1
    strict: bool = False
    write_duplicates: bool = False
    progress: bool = True
    max_bucket: int = 5000  # most different documents one LSH bucket may hold
    executor: str | None = None  # None (this process), "local" or "slurm"
    tasks: int | None = None  # shards (default: one per input file, at most 512)
    work_dir: str | None = None
    slurm: dict = field(default_factory=dict)  # partition, time, cpus_per_task, ...


def run_pipeline(opts: Options) -> list[dict]:
    """Run the pipeline for every JSON key; returns the stats of each (none when the
    stages were submitted to SLURM and run later)."""
    from preprocessing.executors import run

    return run(opts)


@dataclass
class Processed:
    sequences: list[np.ndarray]
    num_tokens: int
    signature: np.ndarray | None = None
    shingles: np.ndarray | None = None


# --------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(recipe: dict, split: bool, append_eod: bool, with_dedup: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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


