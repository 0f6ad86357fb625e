"""Blended datasets: several corpora mixed by weight, as Megatron's ``--data-path``.

``data.data_path`` (and ``data.valid_data_path`` / ``data.test_data_path``) is one shard
prefix or a blend ``"W1 PREFIX1 W2 PREFIX2 ..."`` (weights > 0, normalised to sum 1); in
YAML also a list of ``{weight, path}`` mappings (:func:`blend_text` turns it into the
string form, which is what a run's ``config.yaml`` holds).

The *blend index* says, for every sample ``i`` of the blended dataset, which source it
comes from and which sample of that source: sample ``i`` goes to the source whose
realised count is furthest below ``weight x (i + 1)`` (the first on ties), and is that
source's next sample. So after any ``n`` samples each source has drawn within one sample
of ``weight x n``, and each source is read in its own (shuffled) order, sample 0, 1, 2,
... . The index depends on the weights and the size only; it is built once (by one rank),
saved as ``.npy`` beside the first source's data under a hash of everything it is made
from, and memory-mapped afterwards, as the sample indices are
(:mod:`megatron_lite.data.gpt_dataset`).

(megatron-core's ``build_blending_indices`` compares against ``weight x max(i, 1)``, the
target before sample ``i``; this uses the target after it, which gives the within-one
bound at every prefix.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_lite.data.gpt_dataset import ErrorSync, build_once, cache_key
from megatron_lite.data.indexed import IndexedDataError, IndexedDataset, missing_shard

BLEND_VERSION = 1


@dataclass(frozen=True)
class Source:
    """One corpus of a blend: its normalised weight and shard prefix."""

    weight: float
    prefix: str


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _one_prefix(fields: list[str]) -> bool:
    """Whether the fields are one prefix: a single field, or no number among them (a
    path holding spaces, as a single prefix could before blends; a blend's weights are
    numbers)."""
    return len(fields) == 1 or all(_number(f) is None for f in fields)


def parse_blend(value: str, key: str = "data.data_path") -> list[Source]:
    """The sources of a prefix or a ``"W1 PREFIX1 W2 PREFIX2 ..."`` blend, weights
    normalised. Raises one-line :class:`ValueError`s naming ``key`` and the field."""
    fields = str(value).split()
    if not fields:
        raise ValueError(f"{key} is empty (a shard prefix, or 'WEIGHT PREFIX ...' pairs)")
    if len(fields) == 1 and _number(fields[0]) is not None:
        raise ValueError(f"{key}={value!r}: weight {fields[0]} has no prefix after it")
    if _one_prefix(fields):
        return [Source(1.0, str(value).strip())]
    weights, prefixes = fields[0::2], fields[1::2]
    if len(fields) % 2:
        # a prefix standing where a weight belongs: the pair before it lost its weight
        for i, w in enumerate(weights):
            if _number(w) is None:
                raise ValueError(f"{key}={value!r}: prefix {w!r} (field {2 * i + 1}) has no "
                                 "weight before it; expected WEIGHT PREFIX pairs")
        raise ValueError(f"{key}={value!r}: an odd number of fields ({len(fields)}): weight "
                         f"{weights[-1]} has no prefix after it; expected WEIGHT PREFIX pairs")
    sources = []
    for i, (w, prefix) in enumerate(zip(weights, prefixes, strict=True)):
        number = _number(w)
        if number is None:
            raise ValueError(f"{key}={value!r}: weight {w!r} (field {2 * i + 1}) is not a "
                             "number; expected WEIGHT PREFIX pairs")
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"{key}={value!r}: weight {w} of {prefix} must be a number > 0")
        if _number(prefix) is not None:
            raise ValueError(f"{key}={value!r}: field {2 * i + 2} ({prefix}) is a number where "
                             f"the prefix of weight {w} belongs (a missing prefix?)")
        sources.append((number, prefix))
    seen = [p for _, p in sources]
    if len(set(seen)) != len(seen):
        dup = next(p for p in seen if seen.count(p) > 1)
        raise ValueError(f"{key}={value!r}: prefix {dup} appears twice (give it one weight)")
    total = sum(w for w, _ in sources)
    return [Source(w / total, p) for w, p in sources]


def blend_text(items, key: str = "data.data_path") -> str:
    """A YAML list of ``{weight, path}`` mappings as the blend string (not yet checked:
    :func:`parse_blend` does that). Raises one-line :class:`ValueError`s."""
    parts = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping with weight and path, got {item!r}")
        unknown = set(item) - {"weight", "path"}
        if unknown:
            raise ValueError(f"{where}: unknown field {sorted(map(str, unknown))[0]!r} "
                             "(a blend entry has weight and path)")
        if "path" not in item or item["path"] in (None, ""):
            raise ValueError(f"{where}: weight {item.get('weight')!r} has no path (a missing "
                             "prefix)")
        if "weight" not in item or item["weight"] is None:
            raise ValueError(f"{where}: path {item['path']} has no weight")
        path, weight = str(item["path"]), item["weight"]
        if len(path.split()) != 1:
            raise ValueError(f"{where}: path {path!r} holds spaces (not supported in a blend)")
        if isinstance(weight, bool) or _number(str(weight)) is None:
            raise ValueError(f"{where}: weight {weight!r} of {path} is not a number")
        parts += [str(weight), path]
    if not parts:
        raise ValueError(f"{key}: an empty list (give at least one {{weight, path}})")
    return " ".join(parts)


def format_blend(sources: list[tuple[float, str]]) -> str:
    """The string form of ``(weight, prefix)`` pairs (one prefix alone: just it)."""
    if len(sources) == 1:
        return sources[0][1]
    return " ".join(f"{w} {p}" for w, p in sources)


def raw_blend(value: str) -> list[tuple[float, str]]:
    """``(weight as written, prefix)`` pairs of a valid blend string (one prefix: weight 1)."""
    fields = str(value).split()
    if _one_prefix(fields):
        return [(1.0, str(value).strip())]
    return [(float(w), p) for w, p in zip(fields[0::2], fields[1::2], strict=True)]


def build_blend_index(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(source, source_sample)`` of each of ``size`` blended samples (int16, int64):
    sample ``i`` goes to the source with the largest ``weight x (i + 1) - count`` (the
    first on ties) and is that source's ``count``-th sample.

    Two sources: a closed form (source 0's count after ``n`` samples is
    ``floor(w0 x n + 1/2)``), kept only when it passes :func:`follows_greedy_rule`, which
    checks every step in the same float arithmetic; otherwise (and for more sources) the
    rule itself, one sample at a time."""
    w = np.asarray(weights, dtype=np.float64)
    source = None
    if len(w) == 2 and size:
        count0 = np.floor(w[0] * np.arange(size + 1, dtype=np.float64) + 0.5).astype(np.int64)
        candidate = np.where(np.diff(count0) > 0, 0, 1).astype(np.int16)
        if follows_greedy_rule(w, candidate):
            source = candidate
    if source is None:
        source = _greedy(w.tolist(), size)
    sample = np.empty(size, dtype=np.int64)
    for j in range(len(w)):  # each source's samples in order: 0, 1, 2, ...
        where = np.flatnonzero(source == j)
        sample[where] = np.arange(where.size)
    return source, sample


def _greedy(w: list[float], size: int) -> np.ndarray:
    k = len(w)
    source = np.empty(size, dtype=np.int16)
    counts = [0] * k
    order = range(1, k)
    for i in range(size):
        n = i + 1
        best, best_err = 0, w[0] * n - counts[0]
        for j in order:
            err = w[j] * n - counts[j]
            if err > best_err:
                best, best_err = j, err
        source[i] = best
        counts[best] += 1
    return source


def follows_greedy_rule(w: np.ndarray, source: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether every sample of ``source`` is the source of largest ``w x (i + 1) - count``
    (first on ties), computed as the one-at-a-time rule computes it (float64)."""
    counts = np.zeros(len(w), dtype=np.int64)
    for start in range(0, len(source), chunk):
        part = source[start:start + chunk].astype(np.int64)
        onehot = np.zeros((part.size, len(w)), dtype=np.int64)
        onehot[np.arange(part.size), part] = 1
        before = counts + np.cumsum(onehot, axis=0) - onehot
        n = np.arange(start + 1, start + part.size + 1, dtype=np.float64)[:, None]
        if not np.array_equal(np.argmax(w[None, :] * n - before, axis=1), part):
            return False
        counts = before[-1] + onehot[-1]
    return True


class BlendedDataset:
    """Samples of several datasets mixed by weight (``__getitem__`` as theirs).

    Args:
        sources: the normalised weights and prefixes.
        size: samples in the blend (reads past it wrap around).
        make: ``make(source_number, source, planned)`` -> that source's dataset, holding
            at least the ``planned`` samples the blend draws from it.
        name: split name, for the cache file's name.
        build, sync: as for :class:`~megatron_lite.data.gpt_dataset.GPTDataset`.
    """

    def __init__(self, sources: list[Source], size: int, make, name: str,
                 build: bool = True, sync: ErrorSync | None = None):
        size = max(size, 1)  # a run of 0 steps still has a (one-sample) blend
        self.sources, self.size, self.name = sources, size, name
        self.index_path = blend_index_path(sources, size, name)
        self.cached = self.index_path.exists()
        build_once([self.index_path], build, lambda: [np.stack(
            build_blend_index([s.weight for s in sources], size)).astype(np.int64)], sync)
        index = np.load(self.index_path, mmap_mode="r")
        self.source_index, self.sample_index = index[0], index[1]
        self.planned = planned_counts(self.source_index, len(sources))
        self.datasets = [make(j, s, int(n)) for j, (s, n) in
                         enumerate(zip(sources, self.planned, strict=True))]
        self.seq_length = self.datasets[0].seq_length

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        i %= self.size
        return self.datasets[int(self.source_index[i])][int(self.sample_index[i])]

    def drawn(self, n: int) -> dict[str, int]:
        """Samples drawn from each source (by prefix) by the first ``n`` of the blend."""
        whole, rest = divmod(n, self.size)
        counts = self.planned * whole + planned_counts(self.source_index[:rest],
                                                       len(self.sources))
        return {s.prefix: int(c) for s, c in zip(self.sources, counts, strict=True)}


def planned_counts(source_index: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(np.asarray(source_index, dtype=np.int64), minlength=k).astype(np.int64)


def blend_index_path(sources: list[Source], size: int, name: str) -> Path:
    """Where the blend index of ``sources`` lives: beside the first source's data, named
    by a hash of the version, every source (its shard's identity and weight), the size."""
    first = IndexedDataset(sources[0].prefix)
    parts = [[repr(s.weight), Path(s.prefix + ".idx").stat().st_size,
              Path(s.prefix + ".idx").stat().st_mtime_ns, str(Path(s.prefix).resolve())]
             for s in sources]
    key = cache_key(first, BLEND_VERSION, "blend", size, parts)
    return Path(f"{sources[0].prefix}.{name}.blend.{key}.npy")


def split_source(data_cfg, split: str) -> tuple[str, bool]:
    """``(key, whole)``: the config key a split reads (``data.valid_data_path`` /
    ``data.test_data_path`` when set, else ``data.data_path``) and whether it is read
    whole (its own corpus) rather than as ``data.split``'s part of the training data."""
    key = {"valid": "data.valid_data_path", "test": "data.test_data_path"}.get(split)
    whole = key is not None and getattr(data_cfg, key.split(".")[1]) is not None
    return (key if whole else "data.data_path"), whole


def check_sources_exist(sources: list[Source], key: str) -> None:
    """One line naming ``key`` for a prefix whose shard is missing."""
    for s in sources:
        for ext in (".idx", ".bin"):
            if not Path(s.prefix + ext).is_file():
                raise IndexedDataError(f"{key}: {missing_shard(s.prefix, Path(s.prefix + ext))}")


def blend_plan(data: BlendedDataset, shards: dict[str, IndexedDataset],
               ranges: dict[str, tuple[int, int]], key: str) -> list[str]:
    """The lines a run prints at start: each source's weight, documents, tokens, samples
    planned and epochs (planned samples x ``seq_length`` tokens over the split's tokens);
    a warning for each source read more than once."""
    lines = [f"{key}: a blend of {len(data.sources)} corpora, {data.size} {data.name} "
             "samples planned"]
    warnings = []
    for source, planned in zip(data.sources, data.planned, strict=True):
        shard = shards[source.prefix]
        first, end = ranges[source.prefix]
        di = shard.document_indices
        tokens = int(shard.sequence_lengths[di[first]:di[end]].sum(dtype=np.int64))
        epochs = int(planned) * data.seq_length / max(tokens, 1)
        lines.append(f"  weight {source.weight:.4f}  {source.prefix}: {end - first} documents, "
                     f"{tokens} tokens, {int(planned)} samples planned, {epochs:.2f} epochs")
        if epochs > 1:
            warnings.append(f"warning: {key} source {source.prefix} is repeated: "
                            f"{epochs:.2f} epochs of its {data.name} split")
    return lines + warnings
