"""The preprocessing pipeline: read -> normalize -> tokenize -> filter -> dedup -> shards.

Workers normalize, split, tokenize and hash chunks of documents; the main process
reads the input, keeps results in input order, and runs the (sequential, hence
deterministic) near-duplicate index. The output is the same for any ``--workers``.

With dedup on, filtered documents first go to a staging shard in a temporary folder;
once every cluster is known, the first document of each cluster is copied to the
final shard. Final files appear (by rename) only when complete.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer
from megatron_lite.files import atomic_write, fsync_path
from preprocessing import dedup
from preprocessing.readers import InputError, Record, expand_inputs, read_documents, total_bytes
from preprocessing.sentences import split_sentences

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
CHUNK_DOCS = 64
MAX_ERRORS_LISTED = 5


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


class _OrderedPool:
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


# --------------------------------------------------------------------------- main

def _write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2) + "\n")


class _Run:
    """One pass over the input for one JSON key."""

    def __init__(self, opts: Options, tok: Tokenizer, files: list[Path], key: str,
                 stage: Path):
        self.opts, self.tok, self.files, self.key = opts, tok, files, key
        level = "sentence" if opts.split_sentences else "document"
        self.final_prefix = Path(f"{opts.output_prefix}_{key}_{level}")
        # written into the run's stage folder; run_pipeline moves every key's files into
        # place once all keys have succeeded
        self.out_prefix = stage / self.final_prefix.name
        base = Path(opts.output_prefix).name
        self.stats_path = stage / (f"{base}.stats.json" if len(opts.json_keys) == 1
                                   else f"{base}_{key}.stats.json")
        self.dtype = best_dtype(tok.vocab_size)
        self.stats = {"input_files": len(self.files), "documents_read": 0,
                      "skipped": collections.Counter(), "first_errors": [],
                      "utf8_replaced": 0, "too_short": 0, "duplicates_removed": 0,
                      "duplicate_clusters": 0, "lsh_candidates": 0, "documents_written": 0,
                      "sequences_written": 0, "tokens_written": 0,
                      "bytes_read": total_bytes(self.files)}
        self.index = dedup.NearDuplicateIndex(opts.dedup_threshold) if opts.dedup else None
        self.wheres: list[str] = []

    def _count_error(self, rec: Record) -> None:
        self.stats["skipped"][rec.error] += 1
        if self.opts.strict and rec.error != "empty":
            raise InputError(f"{rec.where}: {rec.error.replace('_', ' ')} (--strict)")
        if len(self.stats["first_errors"]) < MAX_ERRORS_LISTED:
            self.stats["first_errors"].append(f"{rec.where}: {rec.error}")

    def _chunks(self):
        texts, wheres = [], []
        for rec in read_documents(self.files, self.key, self.opts.txt_docs):
            self.stats["documents_read"] += 1
            self.stats["utf8_replaced"] += rec.replaced
            self._bytes_done += rec.nbytes
            if rec.error:
                self._count_error(rec)
                continue
            texts.append(rec.text)
            wheres.append(rec.where)
            if len(texts) == CHUNK_DOCS:
                yield wheres, texts
                texts, wheres = [], []
        if texts:
            yield wheres, texts

    def _consume(self, wheres: list[str], results: list[Processed], writer) -> None:
        for where, item in zip(wheres, results, strict=True):
            if item.num_tokens < self.opts.min_tokens:
                self.stats["too_short"] += 1
                continue
            writer.add_document(item.sequences)
            if self.index is not None:
                self.index.add(item.signature, item.shingles)
                if self.opts.write_duplicates:
                    self.wheres.append(where)
        self._bar.update(len(wheres))
        seconds = max(time.monotonic() - self._t0, 1e-9)
        self._bar.set_postfix_str(f"{self._bytes_done / seconds / 2**20:.1f} MB/s", refresh=False)

    def run(self, pool: _OrderedPool) -> dict:
        from tqdm import tqdm

        t0 = self._t0 = time.monotonic()
        self._bytes_done = 0
        self._bar = tqdm(desc=f"{self.key}", unit=" doc", disable=not self.opts.progress,
                         mininterval=0.5)
        stage_dir = Path(tempfile.mkdtemp(prefix=".stage-", dir=self.out_prefix.parent))
        target = stage_dir / "stage" if self.index is not None else self.out_prefix
        writer = IndexedDatasetWriter(target, self.dtype)
        try:
            for wheres, texts in self._chunks():
                for done in pool.submit(wheres, texts):
                    self._consume(*done, writer)
            for done in pool.drain():
                self._consume(*done, writer)
            self._bar.close()
            if writer.num_documents == 0:
                raise InputError(self._nothing_left())
            if self.index is None:
                self._record_output(writer)
                writer.finalize()
            else:
                writer.finalize()
                self._write_kept(IndexedDataset(target))
            self.stats["seconds"] = round(time.monotonic() - t0, 3)
            self.stats["skipped"] = dict(self.stats["skipped"])
            self.stats["output_prefix"] = str(self.final_prefix)
            _write_json_atomic(self.stats_path, self.stats)
            return self.stats
        except BaseException:
            self._bar.close()
            writer.abort()
            raise
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)

    def _nothing_left(self) -> str:
        s = self.stats
        skipped = ", ".join(f"{n} {why}" for why, n in s["skipped"].most_common())
        first = f"; first: {s['first_errors'][0]}" if s["first_errors"] else ""
        return (f"--json-keys {self.key}: nothing to write: {s['documents_read']} documents "
                f"read, {sum(s['skipped'].values())} skipped{f' ({skipped})' if skipped else ''}"
                f", {s['too_short']} shorter than --min-tokens {self.opts.min_tokens}{first}; "
                "no output written")

    def _write_kept(self, stage: IndexedDataset) -> None:
        clusters = self.index.clusters()
        self.stats["duplicate_clusters"] = len(clusters)
        self.stats["duplicates_removed"] = sum(len(v) for v in clusters.values())
        self.stats["lsh_candidates"] = self.index.candidates
        final = IndexedDatasetWriter(self.out_prefix, self.dtype)
        try:
            for doc in range(stage.num_documents):
                if self.index.is_kept(doc):
                    final.add_document(stage.document(doc))
            self._record_output(final)
            final.finalize()
        except BaseException:
            final.abort()
            raise
        if self.opts.write_duplicates:
            with atomic_write(f"{self.out_prefix}.duplicates.jsonl") as f:
                for kept, removed in sorted(clusters.items()):
                    f.write(json.dumps({"kept": self.wheres[kept],
                                        "removed": [self.wheres[r] for r in removed]}) + "\n")

    def _record_output(self, writer: IndexedDatasetWriter) -> None:
        self.stats["documents_written"] = writer.num_documents
        self.stats["sequences_written"] = writer.num_sequences
        self.stats["tokens_written"] = writer.num_tokens


def run_pipeline(opts: Options) -> list[dict]:
    """Run the pipeline for every JSON key; returns the stats of each."""
    files = expand_inputs(opts.inputs)
    tok = build_tokenizer(opts.tokenizer_type, opts.vocab_file, opts.merge_file,
                          opts.tokenizer_model)
    if opts.append_eod and tok.eod is None:
        raise InputError(f"--append-eod: {opts.tokenizer_type} has no end-of-document token")
    parent = Path(opts.output_prefix).parent
    parent.mkdir(parents=True, exist_ok=True)
    initargs = (tok.recipe, opts.split_sentences, opts.append_eod, opts.dedup)
    pool = _OrderedPool(opts.workers, initargs)
    stage = Path(tempfile.mkdtemp(prefix=".preprocess-", dir=parent))
    try:
        results = []
        for key in opts.json_keys:  # every key's output, or none: a failing key stops all
            run = _Run(opts, tok, files, key, stage)
            results.append(run.run(pool))
        for path in sorted(stage.iterdir()):
            os.replace(path, parent / path.name)
        fsync_path(parent)
        return results
    finally:
        pool.close()
        shutil.rmtree(stage, ignore_errors=True)
