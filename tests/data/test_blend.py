"""Blended datasets: the greedy blend index against a brute-force reimplementation, the
mapping onto each source's planned samples, the cache, the plan, and the bad inputs."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.config import ConfigError, DataConfig, load_config, resolve_paths
from megatron_lite.data.bert_dataset import BertDataset
from megatron_lite.data.blend import (
    BlendedDataset,
    blend_plan,
    build_blend_index,
    follows_greedy_rule,
    parse_blend,
)
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_lite.data.tokenizer import build_tokenizer


def brute_force_blend(weights, n):
    """Sample i to the source whose count is furthest below weight * (i + 1), first on
    ties; written out with plain lists, independently of the library."""
    counts = [0] * len(weights)
    chosen, nth = [], []
    for i in range(n):
        deficits = [w * (i + 1) - c for w, c in zip(weights, counts, strict=True)]
        j = deficits.index(max(deficits))
        chosen.append(j)
        nth.append(counts[j])
        counts[j] += 1
    return chosen, nth


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 1], [2, 3, 5], [0.01, 0.99],
                                     list(np.random.RandomState(0).rand(5))])
def test_blend_index_is_the_greedy_rule_and_within_one_at_every_prefix(weights):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    n = 3000
    source, sample = build_blend_index(w, n)
    chosen, nth = brute_force_blend(list(w), n)
    assert source.tolist() == chosen and sample.tolist() == nth
    assert follows_greedy_rule(w, source)  # the check guarding the two-source closed form
    wrong = source.copy()
    first_change = int(np.flatnonzero(wrong != wrong[0])[0])
    wrong[[0, first_change]] = wrong[[first_change, 0]]
    assert not follows_greedy_rule(w, wrong)
    onehot = np.zeros((n, len(w)))
    onehot[np.arange(n), source] = 1
    counts = np.cumsum(onehot, axis=0)  # counts after each prefix of 1..n samples
    targets = np.arange(1, n + 1)[:, None] * w[None, :]
    worst = np.abs(counts - targets).max()
    print(f"weights {np.round(w, 3).tolist()}: worst |count - weight x n| = {worst:.3f}")
    assert worst <= 1.0


def _shard(path, docs, base):
    writer = IndexedDatasetWriter(path, np.int32)
    for k in range(docs):
        writer.add_document([list(range(base + 100 * k, base + 100 * k + 5 + k % 7))])
    writer.finalize()
    return str(path)


def _gpt_blend(prefixes_weights, size, seq=4):
    sources = parse_blend(" ".join(f"{w} {p}" for w, p in prefixes_weights))
    shards = {s.prefix: IndexedDataset(s.prefix) for s in sources}

    def make(j, source, planned):
        ix = shards[source.prefix]
        return GPTDataset(ix, (0, ix.num_documents), seq, max(planned, 1), seed=3)

    return BlendedDataset(sources, size, make, "train"), shards


def test_blend_maps_onto_each_sources_planned_samples_once(tmp_path):
    a = _shard(tmp_path / "a", 20, 0)
    b = _shard(tmp_path / "b", 9, 100_000)
    c = _shard(tmp_path / "c", 30, 200_000)
    data, _ = _gpt_blend([(0.5, a), (0.2, b), (0.3, c)], 257)
    assert data.planned.sum() == 257
    pairs = {(int(s), int(k)) for s, k in zip(data.source_index, data.sample_index, strict=True)}
    assert len(pairs) == 257  # injective ...
    for j, planned in enumerate(data.planned):  # ... onto 0..planned-1 of every source
        assert sorted(k for s, k in pairs if s == j) == list(range(planned))
        assert len(data.datasets[j]) >= planned
    for i in range(257):  # the sample is that source's own, from its own shard
        j, k = int(data.source_index[i]), int(data.sample_index[i])
        assert np.array_equal(data[i], data.datasets[j][k])
        assert int(data[i][0]) // 100_000 == j
    assert data.drawn(100) == {s.prefix: int((data.source_index[:100] == j).sum())
                               for j, s in enumerate(data.sources)}
    assert data.drawn(257 + 10) == {s.prefix: int(data.planned[j] + (
        data.source_index[:10] == j).sum()) for j, s in enumerate(data.sources)}


def test_blend_index_is_cached_and_rebuilt_when_a_weight_changes(tmp_path):
    a = _shard(tmp_path / "a", 20, 0)
    b = _shard(tmp_path / "b", 9, 100_000)
    first, _ = _gpt_blend([(0.5, a), (0.5, b)], 64)
    assert not first.cached and first.index_path.exists()
    assert first.index_path.parent == tmp_path  # beside the (first source's) data
    stamp = first.index_path.stat().st_mtime_ns
    again, _ = _gpt_blend([(0.5, a), (0.5, b)], 64)
    assert again.cached and again.index_path == first.index_path
    assert again.index_path.stat().st_mtime_ns == stamp  # read, not rewritten
    assert np.array_equal(again.source_index, first.source_index)
    changed, _ = _gpt_blend([(0.6, a), (0.4, b)], 64)
    assert not changed.cached and changed.index_path != first.index_path
    assert not np.array_equal(changed.source_index, first.source_index)
    bigger, _ = _gpt_blend([(0.5, a), (0.5, b)], 65)
    assert not bigger.cached


def test_plan_lines_and_the_repeated_source_warning(tmp_path):
    a = _shard(tmp_path / "a", 20, 0)
    b = _shard(tmp_path / "b", 3, 100_000)  # 3 documents, 18 tokens: read many times
    data, shards = _gpt_blend([(1, a), (1, b)], 40)
    ranges = {p: (0, ix.num_documents) for p, ix in shards.items()}
    lines = blend_plan(data, shards, ranges, "data.data_path")
    text = "\n".join(lines)
    print(text)
    assert f"weight 0.5000  {b}: 3 documents, 18 tokens, 20 samples planned, 4.44 epochs" \
        in text
    assert f"warning: data.data_path source {b} is repeated: 4.44 epochs" in text
    assert f"source {a} is repeated" not in text


def test_bert_sentence_pairs_blend_the_same_way(sentence_shard, wordpiece_file, tmp_path):
    tok = build_tokenizer("BertWordPieceLowerCase", str(wordpiece_file))
    tokens = dict(tok.specials, vocab_size=tok.vocab_size)
    ix = IndexedDataset(sentence_shard)
    half = ix.num_documents // 2
    ranges = [(0, half), (half, ix.num_documents)]
    sources = parse_blend(f"1 {sentence_shard} 3 {tmp_path}/other")
    # the second "corpus" is the same shard read over other documents: a copy of it
    for ext in (".bin", ".idx"):
        shutil.copyfile(str(sentence_shard) + ext, tmp_path / f"other{ext}")

    def make(j, source, planned):
        return BertDataset(IndexedDataset(source.prefix), ranges[j], 64, planned, 5, tokens,
                           DataConfig())

    data = BlendedDataset(sources, 40, make, "train")
    assert data.planned.tolist() == [10, 30]
    for i in range(40):
        j, k = int(data.source_index[i]), int(data.sample_index[i])
        got, want = data[i], data.datasets[j][k]
        assert all(np.array_equal(got[key], want[key]) for key in want)


@pytest.mark.parametrize("value,message", [
    ("abc A 0.7 B", "data.data_path='abc A 0.7 B': weight 'abc' (field 1) is not a number"),
    ("-0.3 A 0.7 B", "weight -0.3 of A must be a number > 0"),
    ("0 A 1 B", "weight 0 of A must be a number > 0"),
    ("0.3 A B", "prefix 'B' (field 3) has no weight before it"),
    ("0.3 A 0.7", "an odd number of fields (3): weight 0.7 has no prefix after it"),
    ("0.3 0.5 0.7 B", "field 2 (0.5) is a number where the prefix of weight 0.3 belongs"),
    ("0.7", "weight 0.7 has no prefix after it"),
    ("", "data.data_path is empty"),
    ("1 A 1 A", "prefix A appears twice"),
])
def test_bad_blends_are_one_line_naming_the_field(value, message):
    with pytest.raises(ValueError) as err:
        parse_blend(value)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("data.data_path")


def test_yaml_list_of_weight_and_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  data_path:\n    - {weight: 3, path: a/x}\n"
                    "    - {weight: 1, path: b/y}\n"
                    "  valid_data_path: [{weight: 1, path: v}]\n")
    cfg = load_config(path)
    assert cfg.data.data_path == "3 a/x 1 b/y" and cfg.data.valid_data_path == "1 v"
    assert [(s.weight, s.prefix) for s in parse_blend(cfg.data.data_path)] == \
        [(0.75, "a/x"), (0.25, "b/y")]
    for text, message in [("[{path: a}]", "data.data_path[0]: path a has no weight"),
                          ("[{weight: 1}]", "data.data_path[0]: weight 1 has no path"),
                          ("[{weight: x, path: a}]", "weight 'x' of a is not a number"),
                          ("[7]", "data.data_path[0]: expected a mapping")]:
        path.write_text(f"data:\n  data_path: {text}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_one_prefix_is_a_source_of_weight_one():
    assert [(s.weight, s.prefix) for s in parse_blend("data/x_text_document")] == \
        [(1.0, "data/x_text_document")]
    assert [round(s.weight, 6) for s in parse_blend("0.3 a 0.7 b 1 c")] == [0.15, 0.35, 0.5]


def test_each_prefix_of_a_blend_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.data_path=0.3 data/a 0.7 ~/b", "data.valid_data_path=v",
                             "data.test_data_path=bad 1 x"])
    resolve_paths(cfg)
    assert cfg.data.data_path == f"0.3 {tmp_path}/data/a 0.7 {Path('~/b').expanduser()}"
    assert cfg.data.valid_data_path == f"{tmp_path}/v"
    assert cfg.data.test_data_path == "bad 1 x"  # left for the check to name
    assert cfg.problems() == ["data.test_data_path='bad 1 x': prefix 'bad' (field 1) has no "
                              "weight before it; expected WEIGHT PREFIX pairs"]
