"""Preprocessing throughput and dedup memory on this machine, in one run on one corpus.

    python bench/preprocess.py [--copies 8]

Corpus: the standard library's docstrings (preprocessing.stdlib_corpus), repeated
``--copies`` times with 25 % of the words of each copy replaced (distinct documents,
no near-duplicates), written as jsonl.

1. MinHash signatures, docs/s on one core, 500-word documents: ours (vectorized word
   5-gram hashing + 128 multiply-add permutations) vs datasketch's
   ``MinHash.update_batch`` on the same shingles (its default SHA-1 hashing).
2. End-to-end MB/s of ``python -m preprocessing`` (2 workers, dedup on) vs the raw
   ``tokenizers`` ``encode_batch`` MB/s on the same texts (the work it cannot skip).
3. Bytes per document held by the dedup index (tracemalloc, LSH + shingle sets).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.data.tokenizer import build_tokenizer  # noqa: E402
from preprocessing import dedup  # noqa: E402
from preprocessing.__main__ import main as preprocess_main  # noqa: E402
from preprocessing.stdlib_corpus import iter_documents  # noqa: E402
from preprocessing.train_tokenizer import train  # noqa: E402


def make_corpus(path: Path, copies: int) -> list[str]:
    rng = random.Random(0)
    base = [d["text"] for d in iter_documents()]
    texts = []
    for c in range(copies):
        for t in base:
            if c == 0:
                texts.append(t)
                continue
            words = t.split(" ")
            for i in rng.sample(range(len(words)), len(words) // 4):
                words[i] = f"w{rng.randrange(10**6)}"
            texts.append(" ".join(words))
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def bench_minhash(texts: list[str]) -> tuple[float, float]:
    words = [w for t in texts for w in re.findall(r"\w+", t.lower())]
    docs = [" ".join(words[i:i + 500]) for i in range(0, min(len(words), 500 * 600), 500)]
    t0 = time.perf_counter()
    for d in docs:
        dedup.minhash(dedup.shingle_hashes(d))
    ours = len(docs) / (time.perf_counter() - t0)

    from datasketch import MinHash

    sample = docs[:200]
    t0 = time.perf_counter()
    for d in sample:
        w = re.findall(r"\w+", d)
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(w[i:i + 5]).encode() for i in range(len(w) - 4)])
    theirs = len(sample) / (time.perf_counter() - t0)
    return ours, theirs


def bench_tokenizer(texts: list[str], vocab: Path, merges: Path) -> float:
    tok = build_tokenizer("GPT2BPETokenizer", str(vocab), str(merges))
    nbytes = sum(len(t.encode()) for t in texts)
    t0 = time.perf_counter()
    for i in range(0, len(texts), 256):
        tok.encode_batch(texts[i:i + 256])
    return nbytes / (time.perf_counter() - t0) / 2**20


def bench_pipeline(corpus: Path, vocab: Path, merges: Path, out: Path) -> tuple[float, dict]:
    args = ["--input", str(corpus), "--output-prefix", str(out / "bench"),
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
            "--merge-file", str(merges), "--workers", "2", "--quiet", "--append-eod"]
    t0 = time.perf_counter()
    assert preprocess_main(args) == 0
    seconds = time.perf_counter() - t0
    stats = json.loads((out / "bench.stats.json").read_text())
    return stats["bytes_read"] / seconds / 2**20, stats


def bench_index_memory(texts: list[str], n: int = 2000) -> float:
    items = []
    for t in texts[:n]:
        sh = dedup.shingle_hashes(t)
        items.append((dedup.minhash(sh), dedup.as32(sh)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        index = dedup.NearDuplicateIndex(0.7)
        for sig, sh in items:
            index.add(sig, sh.copy())
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    words = sum(len(t.split()) for t in texts[:n]) / n
    print(f"   ({n} documents, {words:.0f} words each on average)")
    return used / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=8)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = make_corpus(tmp / "corpus.jsonl", a.copies)
        size = (tmp / "corpus.jsonl").stat().st_size / 2**20
        print(f"corpus: {len(texts)} documents, {size:.1f} MiB of jsonl")
        vocab, merges = train([str(tmp / "corpus.jsonl")], "bpe", 8192, tmp / "tok")

        ours, theirs = bench_minhash(texts)
        print("\n1. MinHash signatures, 500-word documents, 128 permutations, 1 core")
        print(f"   megatron-lite        {ours:9.0f} docs/s")
        print(f"   datasketch           {theirs:9.0f} docs/s   -> {ours / theirs:.1f}x")

        raw = bench_tokenizer(texts, vocab, merges)
        e2e, stats = bench_pipeline(tmp / "corpus.jsonl", vocab, merges, tmp)
        print("\n2. End to end (read, normalize, tokenize, filter, MinHash, LSH, write)")
        print(f"   python -m preprocessing, 2 workers  {e2e:6.2f} MB/s "
              f"({stats['documents_written']} docs written, {stats['too_short']} too short, "
              f"{stats['duplicates_removed']} duplicates)")
        print(f"   tokenizers encode_batch alone       {raw:6.2f} MB/s   -> {e2e / raw:.2f}x")

        print("\n3. Dedup index memory")
        per_doc = bench_index_memory(texts)
        print(f"   {per_doc / 1024:.1f} KiB per document "
              f"({per_doc * 1e6 / 2**30:.1f} GiB per million documents)")


if __name__ == "__main__":
    main()
