"""Megatron .bin/.idx shards: exact bytes, megatron-core interop, merge, and bad files."""

import struct
import warnings

import numpy as np
import pytest

from megatron_lite.data import (
    IndexedDataError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    merge_indexed,
)

# three documents: one sequence, two sequences, one empty-ish sequence
DOCS = [[[5, 6, 7]], [[1], [2, 3, 65000]], [[0]]]


def _write(prefix, docs=DOCS, dtype=np.uint16):
    w = IndexedDatasetWriter(prefix, dtype)
    for doc in docs:
        w.add_document(doc)
    w.finalize()
    return IndexedDataset(prefix)


def _expected_bytes(docs, dtype, code):
    """The layout spelled out by hand, independently of the writer."""
    seqs = [s for d in docs for s in d]
    lengths = [len(s) for s in seqs]
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * np.dtype(dtype).itemsize
    doc_idx, count = [0], 0
    for d in docs:
        count += len(d)
        doc_idx.append(count)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(lengths)}i", *lengths)
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    fmt = {np.uint16: "H", np.int32: "i"}[dtype]
    binary = b"".join(struct.pack(f"<{len(s)}{fmt}", *s) for s in seqs)
    return idx, binary


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_bytes_match_the_documented_layout(tmp_path, dtype, code):
    ds = _write(tmp_path / "x", dtype=dtype)
    idx, binary = _expected_bytes(DOCS, dtype, code)
    assert (tmp_path / "x.idx").read_bytes() == idx
    assert (tmp_path / "x.bin").read_bytes() == binary
    assert len(ds) == 4 and ds.num_documents == 3 and ds.num_tokens == 8
    assert [s.tolist() for s in ds.document(1)] == [[1], [2, 3, 65000]]
    assert ds.get(2, offset=1, length=2).tolist() == [3, 65000]


def test_max_token_reads_in_chunks(tmp_path):
    ds = _write(tmp_path / "d")
    assert [ds.max_token(chunk) for chunk in (1, 2, 3, 1 << 24)] == [65000] * 4
    assert _write(tmp_path / "e", [[[0, 1]], [[2]]]).max_token(chunk=2) == 2


def test_dtype_choice_follows_megatron():
    assert best_dtype(50257) is np.uint16 and best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32 and best_dtype(250000) is np.int32


def test_merge_concatenates_documents(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b", docs=[[[9, 9]], [[8]]])
    merged = merge_indexed([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    idx, binary = _expected_bytes(DOCS + [[[9, 9]], [[8]]], np.uint16, 8)
    assert (tmp_path / "ab.idx").read_bytes() == idx
    assert (tmp_path / "ab.bin").read_bytes() == binary
    assert merged.num_documents == 5


def test_unfinished_writer_leaves_nothing_that_looks_complete(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x")
    w.add_document([[1, 2, 3]])
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage,message", [
    ("missing", "x.idx: no such file"),
    ("short_header", "x.idx: truncated header"),
    ("magic", "not a Megatron MMIDIDX index"),
    ("truncated_idx", "x.idx: 112 bytes, expected 114"),
    ("truncated_bin", "x.bin: 14 bytes, expected 16"),
])
def test_bad_files_give_one_clear_error(tmp_path, damage, message):
    _write(tmp_path / "x")
    idx, binf = tmp_path / "x.idx", tmp_path / "x.bin"
    if damage == "missing":
        idx.unlink()
    elif damage == "short_header":
        idx.write_bytes(idx.read_bytes()[:20])
    elif damage == "magic":
        idx.write_bytes(b"NOTMMIDX\x00" + idx.read_bytes()[9:])
    elif damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-2])
    else:
        binf.write_bytes(binf.read_bytes()[:-2])
    with pytest.raises(IndexedDataError, match=message):
        IndexedDataset(tmp_path / "x")


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_megatron_core_reads_ours_and_writes_the_same_bytes(tmp_path):
    mc = _megatron()
    torch = pytest.importorskip("torch")
    ours = _write(tmp_path / "ours")
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in DOCS:
        for seq in doc:
            builder.add_item(torch.tensor(seq))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()

    theirs_reads_ours = mc.IndexedDataset(str(tmp_path / "ours"))
    assert [theirs_reads_ours[i].tolist() for i in range(len(ours))] == \
        [ours[i].tolist() for i in range(len(ours))]
    assert theirs_reads_ours.document_indices.tolist() == ours.document_indices.tolist()
    ours_reads_theirs = IndexedDataset(tmp_path / "theirs")
    assert [ours_reads_theirs[i].tolist() for i in range(4)] == [[5, 6, 7], [1], [2, 3, 65000], [0]]


def test_megatron_core_merge_matches_ours(tmp_path):
    mc = _megatron()
    _write(tmp_path / "a")
    _write(tmp_path / "b", docs=[[[9, 9]], [[8]]])
    merge_indexed([tmp_path / "a", tmp_path / "b"], tmp_path / "ours")
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    builder.add_index(str(tmp_path / "a"))
    builder.add_index(str(tmp_path / "b"))
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


@pytest.mark.parametrize("field,index,value,message", [
    # DOCS has 4 sequences of 3, 1, 3, 1 tokens (uint16): pointers 0, 6, 8, 14
    ("lengths", 1, -1, "sequence 1 has length -1"),
    ("lengths", 0, 1, "sequence 1 starts at byte 6, but the lengths before it end at byte 2"),
    ("pointers", 2, 4, "sequence 2 starts at byte 4, but the lengths before it end at byte 8"),
    ("docs", 2, 0, "document index entry 2 (0) is below the one before it (1)"),
    ("docs", 3, 3, "the document index runs from 0 to 3, not from 0 to the 4 sequences"),
])
def test_an_index_whose_contents_disagree_is_refused(tmp_path, field, index, value, message):
    """Sizes right, contents wrong (they would train on misread tokens): one line naming
    the file and the first bad entry. Each field is rewritten at its documented offset."""
    _write(tmp_path / "x")
    idx = tmp_path / "x.idx"
    data = bytearray(idx.read_bytes())
    header, n = 9 + 8 + 1 + 8 + 8, 4  # magic, version, dtype code, two counts
    fmt, start = {"lengths": ("<i", header), "pointers": ("<q", header + 4 * n),
                  "docs": ("<q", header + 12 * n)}[field]
    struct.pack_into(fmt, data, start + struct.calcsize(fmt) * index, value)
    if field == "lengths" and value == -1:  # keep the total, so only the contents are wrong
        struct.pack_into("<i", data, header + 4 * 2, 5)
    if field == "lengths" and index == 0:  # 1, 1, 3, 1 -> 1, 3, 3, 1: the same total ...
        struct.pack_into("<i", data, header + 4 * 1, 3)  # ... with the pointers of 3, 1, 3, 1
    idx.write_bytes(bytes(data))
    with pytest.raises(IndexedDataError) as err:
        IndexedDataset(tmp_path / "x")
    assert message in str(err.value) and str(idx) in str(err.value)
    assert "\n" not in str(err.value)
