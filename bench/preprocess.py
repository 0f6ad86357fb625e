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
3. Memory (tracemalloc peak of each task, Python + numpy; the Rust tokenizer's few MB
   are not counted): the one-process path on the corpus vs ``--executor local`` on a
   corpus ``--scale`` times larger with ``--scale`` x more tasks per shard of input; and
   the old streaming datasketch index per document, for comparison.
4. Throughput of ``--executor local --tasks 4`` with 2 workers vs 1, the intermediate
   files' size per document, and the removed set of every path (must be the same).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.data.tokenizer import build_tokenizer  # noqa: E402
from preprocessing import dedup, executors, stages  # noqa: E402
from preprocessing.__main__ import main as preprocess_main  # noqa: E402
from preprocessing.__main__ import parse_args  # noqa: E402
from preprocessing.plan import cleanup, make_plan  # noqa: E402
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


def write_files(folder: Path, texts: list[str], files: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part{i:04d}.jsonl" for i in range(files)]
    per = -(-len(texts) // files)
    for i, path in enumerate(paths):
        with open(path, "w") as f:
            for t in texts[i * per:(i + 1) * per]:
                f.write(json.dumps({"text": t}) + "\n")
    return paths


def staged_run(files: list[Path], vocab: Path, merges: Path, prefix: Path, *extra: str,
               trace: bool = False) -> dict:
    """The stages of one run, in this process (tasks one after another); with ``trace``,
    each task's tracemalloc peak. Returns peaks, seconds, stats and intermediate bytes."""
    opts = parse_args(["--input", *map(str, files), "--output-prefix", str(prefix),
                       "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                       "--merge-file", str(merges), "--quiet", "--append-eod",
                       "--write-duplicates", *extra])
    peaks: dict[str, list[int]] = {}
    real = stages.run_task

    def traced(plan, key, stage, rank, world):
        tracemalloc.start()
        try:
            real(plan, key, stage, rank, world)
        finally:
            peaks.setdefault(stage, []).append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    stages.run_task = traced if trace else real
    try:
        t0 = time.perf_counter()
        plan, _, ours = make_plan(opts)
        executors.run_stages(plan, say=lambda *a: None)
        seconds = time.perf_counter() - t0
        work = Path(plan.work) / "text"
        sizes = {st: sum(f.stat().st_size for f in (work / st).rglob("*") if f.is_file())
                 for st in stages.STAGES}
        stored = sum(s["stored"] for s in stages.task_stats(plan, "text", "prepare"))
        stats = stages.finalize(plan)[0]
        cleanup(plan)
        shutil.rmtree(plan.work)
    finally:
        stages.run_task = real
    audit = Path(f"{prefix}_text_document.duplicates.jsonl").read_text()
    removed = sorted(w.rsplit("/", 1)[-1] for line in audit.splitlines()
                     for w in json.loads(line)["removed"])
    return {"peaks": peaks, "seconds": seconds, "stats": stats, "sizes": sizes,
            "stored": stored, "removed": removed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--scale", type=int, default=10, help="corpus x this for sections 3-4")
    p.add_argument("--dedup-copies", type=int, default=2,
                   help="sections 3-4 start from this many of the copies")
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

        # a corpus with near-duplicates spanning files: every 10th document again, 2 % changed
        rng = random.Random(1)
        base = texts[:len(texts) * a.dedup_copies // a.copies]
        small = base + [" ".join(w if rng.random() > 0.02 else "zz" for w in t.split(" "))
                        for t in base[::10]]
        big = [t if c == 0 else " ".join(f"{w}{c}" if i % 3 == 0 else w
                                         for i, w in enumerate(t.split(" ")))
               for c in range(a.scale) for t in small]  # distinct copies, same shape
        shards = 10
        small_files = write_files(tmp / "small", small, shards)
        big_files = write_files(tmp / "big", big, shards * a.scale)
        one = staged_run(small_files, vocab, merges, tmp / "one", "--workers", "1", trace=True)
        one_big = staged_run(big_files, vocab, merges, tmp / "onebig", "--workers", "1",
                             trace=True)
        many = staged_run(big_files, vocab, merges, tmp / "many", "--executor", "local",
                          "--tasks", str(shards * a.scale), "--workers", "1", trace=True)
        print(f"\n3. Peak memory of a task (tracemalloc): the one-process path on {len(small)} "
              f"documents ({one['stored']} past the length filter) and on {a.scale}x as many "
              f"({one_big['stored']}); --executor local on the {a.scale}x corpus in "
              f"{shards * a.scale} shards")
        print("   stage          one process   one process   sharded: largest task")
        print(f"                    {a.scale}x less      {a.scale}x corpus")
        for st in stages.STAGES:
            peak = [max(r["peaks"][st]) / 2**20 for r in (one, one_big, many)]
            print(f"   {st:<11} {peak[0]:9.1f} MiB {peak[1]:9.1f} MiB {peak[2]:9.1f} MiB "
                  f"({len(many['peaks'][st])} tasks)")
        worst = {k: max(max(v) for st, v in r["peaks"].items() if st != "components")
                 for k, r in (("one", one), ("one_big", one_big), ("many", many))}
        slope = (worst["one_big"] - worst["one"]) / (one_big["stored"] - one["stored"])
        print(f"   largest task: one process {worst['one'] / 2**20:.1f} MiB -> "
              f"{worst['one_big'] / 2**20:.1f} MiB at {a.scale}x the corpus; sharded "
              f"{worst['many'] / 2**20:.1f} MiB (the one global task, components: "
              f"{max(many['peaks']['components']) / many['stored']:.0f} B per document)")
        print(f"   one process: {slope / 1024:.2f} KiB per added document; the old streaming "
              f"datasketch index: {bench_index_memory(texts) / 1024:.1f} KiB per document")
        print("   (prepare's peak is mostly the largest document's hashing temporaries, the same "
              "in any shard;\n   the part that grows with the documents of a task is the "
              "per-document figure above)")
        total = sum(many["sizes"].values())
        print(f"   intermediate files: {total / many['stored'] / 1024:.2f} KiB per document ("
              + ", ".join(f"{st} {v / many['stored']:.0f} B" for st, v in many["sizes"].items())
              + "); the output .bin: "
              f"{2 * many['stats']['tokens_written'] / many['stats']['documents_written']:.0f}"
              " B/doc")

        print(f"\n4. python -m preprocessing --executor local --tasks {shards}, the {a.scale}x "
              f"corpus ({sum(f.stat().st_size for f in big_files) / 2**20:.1f} MiB)")
        seconds, removed = {}, {}
        for workers in (2, 1):
            prefix = tmp / f"w{workers}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "preprocessing", "--input", *map(str, big_files),
                            "--output-prefix", str(prefix), "--tokenizer-type",
                            "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file",
                            str(merges), "--append-eod", "--quiet", "--executor", "local",
                            "--tasks", str(shards), "--workers", str(workers)],
                           check=True, stdout=subprocess.DEVNULL)
            seconds[workers] = time.perf_counter() - t0
            st = json.loads(Path(f"{prefix}.stats.json").read_text())
            removed[workers] = st["duplicates_removed"]
            print(f"   {workers} worker(s): {seconds[workers]:6.1f} s, "
                  f"{st['bytes_read'] / 2**20 / seconds[workers]:.2f} MB/s, "
                  f"{st['duplicates_removed']} near-duplicates removed")
        print(f"   2 workers vs 1: {seconds[1] / seconds[2]:.2f}x")
        assert removed[1] == removed[2]
        same = one["removed"] == staged_run(small_files, vocab, merges, tmp / "ten",
                                            "--executor", "local", "--tasks", "10")["removed"]
        print(f"   removed set, one process vs 10 tasks on the same corpus: "
              f"{'identical' if same else 'DIFFERENT'} ({len(one['removed'])} documents)")


if __name__ == "__main__":
    main()
