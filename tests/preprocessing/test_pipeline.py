"""End to end: `python -m preprocessing` on real text, every input format and bad input."""

import gzip
import json

import pytest

from megatron_lite.data import IndexedDataset
from megatron_lite.data.tokenizer import build_tokenizer
from preprocessing.__main__ import main
from preprocessing.normalize import normalize
from tests.conftest import mutate


def _args(tmp_path, inputs, bpe_files, *extra, prefix="out"):
    vocab, merges = bpe_files
    return ["--input", *map(str, inputs), "--output-prefix", str(tmp_path / prefix),
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
            "--merge-file", str(merges), "--quiet", "--workers", "1", *extra]


def _jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return path


def _stats(tmp_path, prefix="out"):
    return json.loads((tmp_path / f"{prefix}.stats.json").read_text())


def test_tokens_filter_dedup_and_stats(tmp_path, bpe_files, stdlib_docs):
    docs = stdlib_docs[:30]
    texts = docs + ["too short to keep", docs[0], mutate(docs[1], 0.01, 0)]
    src = _jsonl(tmp_path / "in.jsonl", texts)
    assert main(_args(tmp_path, [src], bpe_files, "--append-eod", "--write-duplicates")) == 0

    ds = IndexedDataset(tmp_path / "out_text_document")
    tok = build_tokenizer("GPT2BPETokenizer", *map(str, bpe_files))
    assert ds.num_documents == 30 and len(ds) == 30  # the short one and 2 duplicates gone
    for k in (0, 17, 29):
        tokens = ds[k].tolist()
        assert tokens[-1] == tok.eod and tok.decode(tokens[:-1]) == normalize(docs[k])
    stats = _stats(tmp_path)
    assert stats["documents_read"] == 33 and stats["too_short"] == 1
    assert stats["duplicates_removed"] == 2 and stats["duplicate_clusters"] == 2
    assert stats["documents_written"] == 30 and stats["tokens_written"] == ds.num_tokens
    assert stats["bytes_read"] == src.stat().st_size
    audit = [json.loads(line) for line in
             (tmp_path / "out_text_document.duplicates.jsonl").read_text().splitlines()]
    assert audit == [{"kept": f"{src}:1", "removed": [f"{src}:32"]},
                     {"kept": f"{src}:2", "removed": [f"{src}:33"]}]
    assert not list(tmp_path.glob(".stage-*")) and not list(tmp_path.glob("*.tmp"))

    assert main(_args(tmp_path, [src], bpe_files, "--no-dedup", prefix="nodedup")) == 0
    assert IndexedDataset(tmp_path / "nodedup_text_document").num_documents == 32


def test_output_is_identical_for_any_worker_count(tmp_path, bpe_files, corpus_file):
    for workers in ("1", "2", "3"):
        args = _args(tmp_path, [corpus_file], bpe_files, "--append-eod", prefix=f"w{workers}")
        args[args.index("--workers") + 1] = workers
        assert main(args) == 0
    for ext in ("bin", "idx"):
        blobs = {(tmp_path / f"w{w}_text_document.{ext}").read_bytes() for w in "123"}
        assert len(blobs) == 1


def test_every_input_format_and_folders(tmp_path, bpe_files, stdlib_docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = stdlib_docs[40:52]
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _jsonl(data / "a.jsonl", docs[0:2])
    with gzip.open(data / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs[2:4])
    (data / "c.json").write_text(json.dumps([{"text": t} for t in docs[4:6]]))
    pq.write_table(pa.table({"text": docs[6:10]}), data / "sub" / "d.parquet", row_group_size=1)
    (data / "sub" / "e.txt").write_text(docs[10])
    (data / "sub" / "ignored.csv").write_text("x")
    assert main(_args(tmp_path, [data], bpe_files)) == 0
    ds = IndexedDataset(tmp_path / "out_text_document")
    tok = build_tokenizer("GPT2BPETokenizer", *map(str, bpe_files))
    got = [tok.decode(ds[i].tolist()) for i in range(len(ds))]
    assert got == [normalize(t) for t in docs[:11]]  # sorted file order, then row order


def test_split_sentences_for_bert(tmp_path, wordpiece_file, stdlib_docs):
    src = _jsonl(tmp_path / "in.jsonl", stdlib_docs[60:64])
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "bert"),
            "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(wordpiece_file),
            "--split-sentences", "--quiet", "--workers", "2"]
    assert main(args) == 0
    ds = IndexedDataset(tmp_path / "bert_text_sentence")
    assert ds.num_documents == 4 and len(ds) > 4 * 3
    assert ds.document_indices[0] == 0 and ds.document_indices[-1] == len(ds)
    tok = build_tokenizer("BertWordPieceLowerCase", str(wordpiece_file))
    first = tok.decode(ds[0].tolist()).replace(" ##", "")
    assert normalize(stdlib_docs[60]).lower().split()[0] in first


def test_malformed_lines_are_counted_or_fatal_with_strict(tmp_path, bpe_files, stdlib_docs):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": stdlib_docs[0]}), "{not json", json.dumps(["a list"]),
             json.dumps({"text": 5}), json.dumps({"text": "  "}),
             json.dumps({"text": stdlib_docs[1]})]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "' + \
        stdlib_docs[2].encode()[:2000].replace(b'"', b"'").replace(b"\n", b" ") + b'\xff\xfe"}\n'
    src.write_bytes(raw)
    assert main(_args(tmp_path, [src], bpe_files, "--min-tokens", "10")) == 0
    stats = _stats(tmp_path)
    assert stats["skipped"] == {"malformed_json": 2, "not_a_string": 1, "empty": 1}
    assert stats["first_errors"][0] == f"{src}:2: malformed_json"
    assert stats["utf8_replaced"] == 1 and stats["documents_written"] == 3

    assert main(_args(tmp_path, [src], bpe_files, "--strict", prefix="strict")) == 2
    assert not (tmp_path / "strict_text_document.bin").exists()


@pytest.mark.parametrize("case,message", [
    ("missing_key", "in.jsonl: no record has the key 'text'"),
    ("no_inputs", "no input files found"),
    ("missing_path", "nope.jsonl: no such file or directory"),
    ("all_too_short", "nothing to write: 2 documents read, 0 skipped, 2 shorter than"),
    ("bad_parquet_column", "no column 'text'"),
])
def test_fatal_input_is_one_clear_error_and_no_output(tmp_path, bpe_files, capsys, case,
                                                      message):
    inputs = [tmp_path / "in.jsonl"]
    if case == "missing_key":
        _jsonl(inputs[0], ["x"], key="body")
    elif case == "no_inputs":
        (tmp_path / "empty").mkdir()
        inputs = [tmp_path / "empty"]
    elif case == "missing_path":
        inputs = [tmp_path / "nope.jsonl"]
    elif case == "all_too_short":
        _jsonl(inputs[0], ["short", "also short"])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        inputs = [tmp_path / "in.parquet"]
        pq.write_table(pa.table({"body": ["x"]}), inputs[0])
    assert main(_args(tmp_path, inputs, bpe_files)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not list(tmp_path.glob("out*"))


def test_interrupted_run_leaves_no_output_and_a_rerun_finishes(tmp_path, bpe_files,
                                                               corpus_file, monkeypatch, capsys):
    from preprocessing.workers import OrderedPool

    calls = []
    original = OrderedPool.submit

    def interrupt_on_second_chunk(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    for dedup in ([], ["--no-dedup"]):
        monkeypatch.setattr(OrderedPool, "submit", interrupt_on_second_chunk)
        calls.clear()
        argv = _args(tmp_path, [corpus_file], bpe_files, "--min-tokens", "1", *dedup)
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert "interrupted: no output written; rerun the same command" in err
        leftovers = [p.name for p in tmp_path.iterdir()]
        assert leftovers == [".out.work"], leftovers  # the hidden work folder only
        monkeypatch.setattr(OrderedPool, "submit", original)
        assert main(argv) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == \
            ["out.stats.json", "out_text_document.bin", "out_text_document.idx"]
        for p in tmp_path.iterdir():
            p.unlink()


def test_txt_one_document_per_blank_line_block(tmp_path, bpe_files, stdlib_docs):
    from preprocessing.readers import read_documents

    docs = [" ".join(t.split()) for t in stdlib_docs[70:73]]  # no blank lines inside
    src = tmp_path / "in.txt"
    src.write_text(f"\n\n{docs[0]}\n \t\n\n{docs[1][:300]}\n{docs[1][300:]}\n\n{docs[2]}")
    recs = list(read_documents([src], txt_docs="blank-line"))
    assert [r.where for r in recs] == [f"{src}:3", f"{src}:6", f"{src}:9"]
    assert [r.text for r in recs] == [docs[0], f"{docs[1][:300]}\n{docs[1][300:]}", docs[2]]
    assert main(_args(tmp_path, [src], bpe_files, "--txt-docs", "blank-line")) == 0
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert ds.num_documents == 3 and _stats(tmp_path)["documents_read"] == 3
    assert main(_args(tmp_path, [src], bpe_files, prefix="whole")) == 0  # default: the file
    assert IndexedDataset(tmp_path / "whole_text_document").num_documents == 1


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_several_json_keys_are_written_all_or_none(tmp_path, bpe_files, stdlib_docs, capsys,
                                                   fmt):
    """``--json-keys content id``: ``id`` is not text, so the error names it, and the
    ``content`` shard (processed first, successfully) is not left behind either."""
    docs = stdlib_docs[:4]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"content": docs, "id": list(range(4)),
                                 "title": [d[:600] for d in docs]}), path)
        message = "column 'id' holds int64, not text"
    else:
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps({"content": d, "id": i, "title": d[:600]}) + "\n"
                                for i, d in enumerate(docs)))
        message = "--json-keys id: nothing to write: 4 documents read, 4 skipped (4 not_a_string)"
    out = tmp_path / "out"
    out.mkdir()
    argv = _args(out, [path], bpe_files, "--json-keys", "content", "id")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert list(out.iterdir()) == []  # no shard, no stats, no stage folder
    assert main(_args(out, [path], bpe_files, "--json-keys", "content", "title")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"out_{k}_document{ext}" for k in ("content", "title")
                            for ext in (".bin", ".idx")]
                           + ["out_content.stats.json", "out_title.stats.json"])
    assert IndexedDataset(str(out / "out_content_document")).num_documents == 4


@pytest.mark.parametrize("case,message", [
    ("truncated_gz", "in.jsonl.gz: not a complete gzip file"),
    ("not_gz", "in.jsonl.gz: not a complete gzip file"),
])
def test_a_broken_gzip_is_one_clear_error_and_no_output(tmp_path, bpe_files, stdlib_docs,
                                                         capsys, case, message):
    import gzip

    src = tmp_path / "in.jsonl.gz"
    body = "".join(json.dumps({"text": t}) + "\n" for t in stdlib_docs[:20]).encode()
    packed = gzip.compress(body)
    src.write_bytes(packed[:len(packed) // 2] if case == "truncated_gz" else body)
    assert main(_args(tmp_path, [src], bpe_files, "--min-tokens", "10")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not list(tmp_path.glob("out*"))


def test_a_line_nested_too_deeply_is_a_counted_skip(tmp_path, bpe_files, stdlib_docs):
    """json.loads raises RecursionError past Python's stack: one malformed line, not a
    crash of the whole run."""
    src = tmp_path / "in.jsonl"
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    src.write_text("\n".join([json.dumps({"text": stdlib_docs[0]}), deep,
                              json.dumps({"text": stdlib_docs[1]})]) + "\n")
    assert main(_args(tmp_path, [src], bpe_files, "--min-tokens", "10")) == 0
    stats = _stats(tmp_path)
    assert stats["skipped"] == {"malformed_json": 1} and stats["documents_written"] == 2
