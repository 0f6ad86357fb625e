"""The preprocessing stages, as tasks an executor runs: prepare, candidates, verify,
components, write, finalize.

Every task reads only what earlier stages wrote under the work folder and writes one
folder of its own under a temporary name, renamed when complete (``written_dir``), so a
task is idempotent: rerun after a kill, it redoes its work and replaces its folder with
the same bytes. Document ids are ``shard << 32 | index`` (``index`` counts the documents
of the shard that passed ``--min-tokens``), so id order is input order and "the smallest
id of a cluster" is "its first document", as in the single-process index.

    prepare     (one task per shard: a contiguous range of the input file list)
                read, normalize, tokenize, length filter -> docs.bin/.idx; for dedup the
                sorted shingle sets (uint32, with offsets), a 128-bit digest of each set,
                and per LSH band the rows ``[5 x uint32 band key, shard, index]`` sorted
                by key, with the row where each key range starts.
    candidates  (tasks over band x key range): merge the shards' rows of one key range,
                group equal keys; documents with identical shingle sets (equal digests)
                are merged outright and represented by their first; every other pair in
                a bucket is a candidate (no chain/star shortcut: Jaccard is not
                transitive). Pairs are written grouped by their shard pair.
    verify      (tasks over shard pairs): the candidates of one shard pair, deduplicated,
                checked by exact Jaccard on the memory-mapped shingle sets -> edges.
    components  (one task): connected components of all edges; each keeps its smallest id.
    write       (one task per shard): the kept documents of the shard.
    finalize    (one task, all keys): merge the shards in order into the final
                ``.bin/.idx``, stats and duplicates audit; all keys' files appear together.

The result does not depend on the number of tasks: the same documents in the same order,
the same clusters, byte-identical shards.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.files import atomic_write, fsync_path, written_dir
from preprocessing import dedup
from preprocessing.plan import Plan, cleanup
from preprocessing.readers import InputError, read_documents
from preprocessing.workers import OrderedPool

MAX_ERRORS_LISTED = 5
CHUNK_DOCS = 64
ROW = dedup.ROWS + 2  # band key words, shard, index
STAGES = ("prepare", "candidates", "verify", "components", "write")


def _load_json(path: Path):
    return json.loads(Path(path).read_text())


def _dump_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def task_stats(plan: Plan, key: str, stage: str) -> list[dict]:
    """The stats.json of every finished task of a stage, in task order."""
    root = plan.dir(key, stage)
    if not root.is_dir():
        return []
    return [_load_json(d / "stats.json") for d in sorted(root.iterdir())
            if d.name.isdigit() and (d / "stats.json").exists()]


# --------------------------------------------------------------------------- prepare

def prepare(plan: Plan, key: str, shard: int) -> None:
    from tqdm import tqdm

    opts = plan.opts
    tok = build_tokenizer(opts.tokenizer_type, opts.vocab_file, opts.merge_file,
                          opts.tokenizer_model)
    files = [Path(f) for f in plan.shard_files(shard)]
    stats = {"files": len(files), "documents_read": 0, "skipped": collections.Counter(),
             "first_errors": [], "utf8_replaced": 0, "too_short": 0, "stored": 0,
             "bytes_read": sum(os.path.getsize(f) for f in files)}
    bar = tqdm(desc=key, unit=" doc", disable=not plan.progress, mininterval=0.5)
    t0 = time.monotonic()
    done_bytes = 0

    def chunks():
        nonlocal done_bytes
        texts, wheres = [], []
        for rec in read_documents(files, key, opts.txt_docs):
            stats["documents_read"] += 1
            stats["utf8_replaced"] += rec.replaced
            done_bytes += rec.nbytes
            if rec.error:
                stats["skipped"][rec.error] += 1
                if opts.strict and rec.error != "empty":
                    raise InputError(f"{rec.where}: {rec.error.replace('_', ' ')} (--strict)")
                if len(stats["first_errors"]) < MAX_ERRORS_LISTED:
                    stats["first_errors"].append(f"{rec.where}: {rec.error}")
                continue
            texts.append(rec.text)
            wheres.append(rec.where)
            if len(texts) == CHUNK_DOCS:
                yield wheres, texts
                texts, wheres = [], []
        if texts:
            yield wheres, texts

    pool = OrderedPool(plan.pool_workers, (tok.recipe, opts.split_sentences, opts.append_eod,
                                           opts.dedup))
    try:
        with written_dir(plan.dir(key, "prepare", shard)) as out:
            writer = IndexedDatasetWriter(out / "docs", best_dtype(tok.vocab_size))
            signatures, digests, offsets, kept_wheres = [], [], [0], []
            with open(out / "shingles.u32", "wb") as shingles:
                def consume(wheres, results):
                    for where, item in zip(wheres, results, strict=True):
                        if item.num_tokens < opts.min_tokens:
                            stats["too_short"] += 1
                            continue
                        writer.add_document(item.sequences)
                        if opts.dedup:
                            shingles.write(item.shingles.tobytes())
                            offsets.append(offsets[-1] + item.shingles.size)
                            signatures.append(item.signature)
                            digests.append(hashlib.blake2b(item.shingles.tobytes(),
                                                           digest_size=16).digest())
                        if opts.write_duplicates:
                            kept_wheres.append(where)
                    bar.update(len(wheres))
                    seconds = max(time.monotonic() - t0, 1e-9)
                    bar.set_postfix_str(f"{done_bytes / seconds / 2**20:.1f} MB/s",
                                        refresh=False)

                try:
                    for wheres, texts in chunks():
                        for done in pool.submit(wheres, texts):
                            consume(*done)
                    for done in pool.drain():
                        consume(*done)
                    writer.finalize()
                except BaseException:
                    writer.abort()
                    raise
            stats["stored"] = writer.num_documents
            if opts.dedup:
                np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.uint64))
                np.save(out / "digests.npy", np.frombuffer(b"".join(digests), dtype=np.uint64)
                        .reshape(-1, 2))
                _write_band_rows(out, plan.key_ranges, shard, signatures)
            if opts.write_duplicates:
                _dump_json(out / "where.json", kept_wheres)
            stats["skipped"] = dict(stats["skipped"])
            stats["seconds"] = round(time.monotonic() - t0, 3)
            _dump_json(out / "stats.json", stats)
    finally:
        bar.close()
        pool.close()


def range_bounds(key_ranges: int) -> np.ndarray:
    """Where each key range starts in the first band word's 32-bit space (plus the end)."""
    return np.array([(r << 32) // key_ranges for r in range(key_ranges + 1)], dtype=np.uint64)


def _write_band_rows(out: Path, key_ranges: int, shard: int, signatures: list) -> None:
    n = len(signatures)
    sig = np.stack(signatures) if n else np.zeros((0, dedup.NUM_PERM), dtype=np.uint32)
    bounds = range_bounds(key_ranges)
    for band in range(dedup.BANDS):
        rows = np.empty((n, ROW), dtype=np.uint32)
        rows[:, :dedup.ROWS] = sig[:, band * dedup.ROWS:(band + 1) * dedup.ROWS]
        rows[:, dedup.ROWS] = shard
        rows[:, dedup.ROWS + 1] = np.arange(n, dtype=np.uint32)
        rows = rows[np.lexsort(rows.T[::-1])]  # by key words, then id
        starts = np.searchsorted(rows[:, 0].astype(np.uint64), bounds)
        np.save(out / f"band{band:02d}.npy", rows)
        np.save(out / f"band{band:02d}.starts.npy", starts.astype(np.int64))


# --------------------------------------------------------------------------- candidates

def _gid(shard, index) -> np.ndarray:
    return (np.asarray(shard, dtype=np.uint64) << np.uint64(32)) | np.asarray(index, np.uint64)


def candidates(plan: Plan, key: str, task: int, world: int) -> None:
    items = [(b, r) for b in range(dedup.BANDS) for r in range(plan.key_ranges)][task::world]
    pairs, same = [np.zeros((0, 2), np.uint64)], [np.zeros((0, 2), np.uint64)]
    digests = [np.load(plan.dir(key, "prepare", s) / "digests.npy", mmap_mode="r")
               for s in range(plan.shards)]
    largest = 0
    t0 = time.monotonic()
    for band, rng in items:
        parts = []
        for s in range(plan.shards):
            d = plan.dir(key, "prepare", s)
            starts = np.load(d / f"band{band:02d}.starts.npy")
            rows = np.load(d / f"band{band:02d}.npy", mmap_mode="r")
            parts.append(np.asarray(rows[starts[rng]:starts[rng + 1]]))
        rows = np.concatenate(parts) if parts else np.zeros((0, ROW), np.uint32)
        rows = rows[np.lexsort(rows.T[::-1])]
        p, q, big = _bucket_pairs(rows, digests, band, plan.opts.max_bucket)
        pairs.append(p)
        same.append(q)
        largest = max(largest, big)
    pairs = np.unique(np.concatenate(pairs), axis=0)
    same = np.unique(np.concatenate(same), axis=0)
    # group by shard pair, so a verify task reads one slice of each candidates file
    pk = (pairs[:, 0] >> np.uint64(32)) * np.uint64(plan.shards) + (pairs[:, 1] >> np.uint64(32))
    order = np.lexsort((pairs[:, 1], pairs[:, 0], pk))
    pairs, pk = pairs[order], pk[order]
    keys, starts = np.unique(pk, return_index=True)
    with written_dir(plan.dir(key, "candidates", task)) as out:
        np.save(out / "pairs.npy", pairs)
        np.save(out / "pair_keys.npy", keys)
        np.save(out / "pair_starts.npy", np.append(starts, len(pairs)).astype(np.int64))
        np.save(out / "identical.npy", same)
        _dump_json(out / "stats.json", {"items": len(items), "pairs": len(pairs),
                                        "identical": len(same), "largest_bucket": largest,
                                        "seconds": round(time.monotonic() - t0, 3)})


def _bucket_pairs(rows: np.ndarray, digests: list, band: int, cap: int):
    """Candidate pairs and identical-set links among rows sorted by band key."""
    empty = np.zeros((0, 2), np.uint64)
    if len(rows) < 2:
        return empty, empty, len(rows)
    k = dedup.ROWS
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (rows[1:, :k] != rows[:-1, :k]).any(axis=1)
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(rows)))
    multi = sizes >= 2
    if not multi.any():
        return empty, empty, 1
    starts, sizes = starts[multi], sizes[multi]
    member = np.repeat(starts, sizes) + (np.arange(sizes.sum()) -
                                         np.repeat(np.cumsum(sizes) - sizes, sizes))
    shard, index = rows[member, k].astype(np.int64), rows[member, k + 1].astype(np.int64)
    dig = np.empty((len(member), 2), dtype=np.uint64)
    for s in np.unique(shard):
        sel = shard == s
        dig[sel] = digests[s][index[sel]]
    gid = _gid(shard, index)
    offsets = np.cumsum(sizes) - sizes  # each group's first position in ``member``
    # buckets of two, the common case, at once: one link if the sets are identical, else
    # one candidate pair
    two = offsets[sizes == 2]
    equal = (dig[two] == dig[two + 1]).all(axis=1)
    pair_rows = np.stack([gid[two], gid[two + 1]], axis=1)
    pairs, same = [pair_rows[~equal]], [pair_rows[equal]]
    largest = 2 if (~equal).any() else 1
    for pos, size in zip(offsets[sizes > 2].tolist(), sizes[sizes > 2].tolist(), strict=True):
        ids, dg = gid[pos:pos + size], dig[pos:pos + size]
        # identical shingle sets: linked to the first of them, which stands for all
        _, first, inverse = np.unique(dg, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        rep = ids[first[inverse]]
        dup = rep != ids
        if dup.any():
            same.append(np.stack([rep[dup], ids[dup]], axis=1))
        reps = np.sort(ids[first])
        largest = max(largest, reps.size)
        if reps.size > cap:
            raise InputError(
                f"LSH band {band}: {reps.size} different documents share one bucket (more "
                f"than --max-bucket {cap}, {reps.size * (reps.size - 1) // 2} pairs to check); "
                "raise --max-bucket, or look for templated text flooding the input")
        if reps.size >= 2:
            i, j = np.triu_indices(reps.size, 1)
            pairs.append(np.stack([reps[i], reps[j]], axis=1))
    return (np.concatenate(pairs) if pairs else empty,
            np.concatenate(same) if same else empty, largest)


# --------------------------------------------------------------------------- verify

def shard_pairs(shards: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(shards) for j in range(i, shards)]


class _Shingles:
    """The shingle sets of one prepared shard, memory-mapped."""

    def __init__(self, folder: Path):
        self.offsets = np.load(folder / "offsets.npy")
        size = os.path.getsize(folder / "shingles.u32")
        self.data = (np.memmap(folder / "shingles.u32", dtype=np.uint32, mode="r")
                     if size else np.zeros(0, np.uint32))

    def __getitem__(self, index: int) -> np.ndarray:
        return self.data[self.offsets[index]:self.offsets[index + 1]]


def verify(plan: Plan, key: str, task: int, world: int) -> None:
    threshold = plan.opts.dedup_threshold
    cand = [plan.dir(key, "candidates", t) for t in range(plan.tasks)]
    keys = [np.load(d / "pair_keys.npy") for d in cand]
    starts = [np.load(d / "pair_starts.npy") for d in cand]
    all_pairs = [np.load(d / "pairs.npy", mmap_mode="r") for d in cand]
    edges, checked = [np.zeros((0, 2), np.uint64)], 0
    t0 = time.monotonic()
    for i, j in shard_pairs(plan.shards)[task::world]:
        pk = np.uint64(i * plan.shards + j)
        parts = []
        for held, k, s in zip(all_pairs, keys, starts, strict=True):
            at = np.searchsorted(k, pk)
            if at < len(k) and k[at] == pk:
                parts.append(np.asarray(held[s[at]:s[at + 1]]))
        if not parts:
            continue
        pairs = np.unique(np.concatenate(parts), axis=0)
        checked += len(pairs)
        left = _Shingles(plan.dir(key, "prepare", i))
        right = left if i == j else _Shingles(plan.dir(key, "prepare", j))
        low = np.uint64(0xFFFFFFFF)
        ok = np.fromiter((dedup.jaccard(left[int(a & low)], right[int(b & low)]) >= threshold
                          for a, b in pairs), dtype=bool, count=len(pairs))
        edges.append(pairs[ok])
    edges = np.concatenate(edges)
    with written_dir(plan.dir(key, "verify", task)) as out:
        np.save(out / "edges.npy", edges)
        _dump_json(out / "stats.json", {"checked": checked, "confirmed": len(edges),
                                        "seconds": round(time.monotonic() - t0, 3)})


# --------------------------------------------------------------------------- components

def _compact(gids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return offsets[(gids >> np.uint64(32)).astype(np.int64)] + \
        (gids & np.uint64(0xFFFFFFFF)).astype(np.int64)


def components(plan: Plan, key: str) -> None:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    t0 = time.monotonic()
    stored = [_load_json(plan.dir(key, "prepare", s) / "stats.json")["stored"]
              for s in range(plan.shards)]
    offsets = np.concatenate([[0], np.cumsum(stored)]).astype(np.int64)
    n = int(offsets[-1])
    edges = [np.load(plan.dir(key, "verify", t) / "edges.npy") for t in range(plan.tasks)]
    edges += [np.load(plan.dir(key, "candidates", t) / "identical.npy")
              for t in range(plan.tasks)]
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64)
    a, b = _compact(edges[:, 0], offsets), _compact(edges[:, 1], offsets)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    count, labels = connected_components(graph, directed=False) if n else (0, np.zeros(0, int))
    first = np.full(count, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n, dtype=np.int64))
    kept_of = first[labels]
    removed = np.flatnonzero(kept_of != np.arange(n))
    with written_dir(plan.dir(key, "components")) as out:
        # removed documents (compact ids, ascending) and the document each one joins
        np.save(out / "removed.npy", removed)
        np.save(out / "kept_of.npy", kept_of[removed])
        np.save(out / "offsets.npy", offsets)
        _dump_json(out / "stats.json", {
            "documents": n, "edges": len(a), "duplicates_removed": len(removed),
            "duplicate_clusters": int(np.unique(kept_of[removed]).size),
            "seconds": round(time.monotonic() - t0, 3)})


# --------------------------------------------------------------------------- write

def write(plan: Plan, key: str, shard: int) -> None:
    comp = plan.dir(key, "components")
    offsets = np.load(comp / "offsets.npy")
    removed = np.load(comp / "removed.npy")
    lo, hi = np.searchsorted(removed, offsets[shard:shard + 2])
    drop = np.zeros(int(offsets[shard + 1] - offsets[shard]), dtype=bool)
    drop[removed[lo:hi] - offsets[shard]] = True
    source = IndexedDataset(plan.dir(key, "prepare", shard) / "docs")
    with written_dir(plan.dir(key, "write", shard)) as out:
        writer = IndexedDatasetWriter(out / "kept", source.dtype)
        try:
            for doc in np.flatnonzero(~drop).tolist():
                writer.add_document(source.document(doc))
            writer.finalize()
        except BaseException:
            writer.abort()
            raise
        _dump_json(out / "stats.json", {"documents": writer.num_documents})


# --------------------------------------------------------------------------- finalize

def _shard_prefix(plan: Plan, key: str, shard: int) -> Path:
    if plan.opts.dedup:
        return plan.dir(key, "write", shard) / "kept"
    return plan.dir(key, "prepare", shard) / "docs"


def finalize(plan: Plan) -> list[dict]:
    """Merge every key's shards and stats into a staging folder next to the output, then
    move all of them into place together. Returns each key's stats."""
    parent = Path(plan.opts.output_prefix).parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".preprocess-", dir=parent))
    try:
        results = [_finalize_key(plan, key, stage) for key in plan.opts.json_keys]
        for path in sorted(stage.iterdir()):
            os.replace(path, parent / path.name)
        fsync_path(parent)
        return results
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _finalize_key(plan: Plan, key: str, stage: Path) -> dict:
    prep = task_stats(plan, key, "prepare")
    stats = {"input_files": len(plan.files),
             "documents_read": sum(s["documents_read"] for s in prep),
             "skipped": dict(sorted(sum((collections.Counter(s["skipped"]) for s in prep),
                                        collections.Counter()).items())),
             "first_errors": [e for s in prep for e in s["first_errors"]][:MAX_ERRORS_LISTED],
             "utf8_replaced": sum(s["utf8_replaced"] for s in prep),
             "too_short": sum(s["too_short"] for s in prep),
             "duplicates_removed": 0, "duplicate_clusters": 0, "lsh_candidates": 0,
             "documents_written": 0, "sequences_written": 0, "tokens_written": 0,
             "bytes_read": sum(s["bytes_read"] for s in prep)}
    if plan.opts.dedup and sum(s["stored"] for s in prep):
        comp = _load_json(plan.dir(key, "components") / "stats.json")
        stats["duplicates_removed"] = comp["duplicates_removed"]
        stats["duplicate_clusters"] = comp["duplicate_clusters"]
        stats["lsh_candidates"] = sum(s["checked"] for s in task_stats(plan, key, "verify"))
    if sum(s["stored"] for s in prep) == 0:
        raise InputError(_nothing_left(plan, key, stats))
    final = plan.final_prefix(key)
    out = stage / final.name
    writer = IndexedDatasetWriter(out, IndexedDataset(_shard_prefix(plan, key, 0)).dtype)
    try:
        for shard in range(plan.shards):
            writer.add_shard(IndexedDataset(_shard_prefix(plan, key, shard)))
        stats["documents_written"] = writer.num_documents
        stats["sequences_written"] = writer.num_sequences
        stats["tokens_written"] = writer.num_tokens
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    if plan.opts.dedup and plan.opts.write_duplicates:
        _write_audit(plan, key, Path(f"{out}.duplicates.jsonl"))
    stats["seconds"] = round(time.time() - plan.started, 3)
    stats["output_prefix"] = str(final)
    with atomic_write(stage / plan.stats_name(key)) as f:
        f.write(json.dumps(stats, indent=2) + "\n")
    return stats


def _write_audit(plan: Plan, key: str, path: Path) -> None:
    comp = plan.dir(key, "components")
    removed, kept_of = np.load(comp / "removed.npy"), np.load(comp / "kept_of.npy")
    offsets = np.load(comp / "offsets.npy")
    wheres = [w for s in range(plan.shards)
              for w in _load_json(plan.dir(key, "prepare", s) / "where.json")]
    assert len(wheres) == offsets[-1]
    clusters: dict[int, list[int]] = {}
    for r, k in zip(removed.tolist(), kept_of.tolist(), strict=True):
        clusters.setdefault(k, []).append(r)
    with atomic_write(path) as f:
        for kept, members in sorted(clusters.items()):
            f.write(json.dumps({"kept": wheres[kept],
                                "removed": [wheres[r] for r in members]}) + "\n")


def _nothing_left(plan: Plan, key: str, s: dict) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in s["skipped"].items())
    first = f"; first: {s['first_errors'][0]}" if s["first_errors"] else ""
    return (f"--json-keys {key}: nothing to write: {s['documents_read']} documents "
            f"read, {sum(s['skipped'].values())} skipped{f' ({skipped})' if skipped else ''}"
            f", {s['too_short']} shorter than --min-tokens {plan.opts.min_tokens}{first}; "
            "no output written")


def finalize_and_report(plan: Plan) -> list[dict]:
    """The finalize stage as a SLURM job runs it: outputs, cleanup, a summary line."""
    results = finalize(plan)
    cleanup(plan)
    for s in results:
        print(summary_line(s))
    return results


def summary_line(s: dict) -> str:
    """The line ``python -m preprocessing`` prints for each key it wrote."""
    return (f"{s['output_prefix']}: {s['documents_written']} documents, "
            f"{s['tokens_written']} tokens ({s['documents_read']} read, "
            f"{sum(s['skipped'].values())} skipped, {s['too_short']} too short, "
            f"{s['duplicates_removed']} near-duplicates removed) in {s['seconds']:.1f}s")


def run_task(plan: Plan, key: str | None, stage: str, rank: int, world: int) -> None:
    """One task of one stage (what an executor calls)."""
    if stage == "prepare":
        prepare(plan, key, rank)
    elif stage == "candidates":
        candidates(plan, key, rank, world)
    elif stage == "verify":
        verify(plan, key, rank, world)
    elif stage == "components":
        components(plan, key)
    elif stage == "write":
        write(plan, key, rank)
    elif stage == "finalize":
        finalize_and_report(plan)
    else:
        raise ValueError(f"unknown stage {stage!r}")
