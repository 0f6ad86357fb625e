"""Megatron-LM's indexed binary shards (``MMIDIDX``): ``PREFIX.bin`` + ``PREFIX.idx``.

``.bin`` holds the token arrays back to back. ``.idx`` (little-endian, no padding):

    0   9 bytes  b"MMIDIDX\\x00\\x00"
    9   <Q       version = 1
    17  <B       dtype code (see DTYPE_CODES)
    18  <Q       S = number of sequences
    26  <Q       D = number of documents + 1
    34  int32[S] sequence lengths (tokens)
        int64[S] byte offset of each sequence in .bin
        int64[D] document index: document k = sequences [di[k], di[k+1])

A sequence is a document, or one sentence of it (``--split-sentences``). Files are
byte-identical to those written by megatron-core's ``IndexedDatasetBuilder``.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np

from megatron_lite.files import publish, temp_name

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D  (34 bytes)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDataError(ValueError):
    """A shard that cannot be read (missing, truncated, bad header)."""


def best_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits comfortably (< 65,500 entries, as Megatron), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def missing_shard(prefix: str, path: Path) -> str:
    """The one line for a shard file that is not there, with a hint (a prefix given
    with its ``.bin``/``.idx`` suffix says to drop it)."""
    hint = "is the data prefix right?"
    if prefix.endswith((".bin", ".idx")):
        hint = f"the data path is a prefix without .bin/.idx: drop the suffix, {prefix[:-4]}"
    return f"{path}: no such file ({hint})"


class IndexedDatasetWriter:
    """Write a shard under temporary names; :meth:`finalize` renames it into place.

    Until ``finalize`` returns, no file named ``PREFIX.bin``/``PREFIX.idx`` exists, so an
    interrupted run never leaves a pair that looks complete.

    Args:
        prefix: output path without ``.bin``/``.idx``.
        dtype: token dtype (see :func:`best_dtype`).
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._tmp_bin = temp_name(f"{self.prefix}.bin", unique=True)
        self._tmp_idx = temp_name(f"{self.prefix}.idx", unique=True)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._lengths: list[int] = []
        self._doc_idx: list[int] = [0]
        self.num_tokens = 0

    def add_sequence(self, tokens) -> None:
        """Append one sequence (a document, or a sentence of the current document)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(arr.size)
        self.num_tokens += arr.size

    def end_document(self) -> None:
        """Close the current document (after its sequences)."""
        self._doc_idx.append(len(self._lengths))

    def add_document(self, sequences) -> None:
        """Append a whole document given as a list of sequences."""
        for seq in sequences:
            self.add_sequence(seq)
        self.end_document()

    def add_shard(self, shard: IndexedDataset) -> None:
        """Append every document of another shard (same dtype), copying its bytes in bulk."""
        if shard.dtype != self.dtype:
            raise IndexedDataError(f"{shard.prefix}: dtype {shard.dtype} differs from {self.dtype}")
        with open(f"{shard.prefix}.bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 * 2**20)
        offset = len(self._lengths)
        self._lengths.extend(shard.sequence_lengths.tolist())
        self._doc_idx.extend((shard.document_indices[1:] + offset).tolist())
        self.num_tokens += shard.num_tokens

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index, fsync both files, and rename them into place (bin first)."""
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, CODE_OF[self.dtype], len(lengths), len(doc_idx)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        publish(self._tmp_bin, f"{self.prefix}.bin")
        publish(self._tmp_idx, f"{self.prefix}.idx")

    def abort(self) -> None:
        """Drop the temporary files (nothing is left under the final names)."""
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)


class IndexedDataset:
    """Memory-mapped reader of a shard.

    Args:
        prefix: path without ``.bin``/``.idx``.

    Raises:
        IndexedDataError: missing files, bad magic/version/dtype, or sizes that do not
            add up (a truncated ``.idx`` or ``.bin``), with the file named.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise IndexedDataError(missing_shard(self.prefix, p))
        size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise IndexedDataError(f"{idx_path}: truncated header ({size} bytes)")
        magic, version, code, n_seq, n_doc = HEADER.unpack(head)
        if magic != MAGIC:
            raise IndexedDataError(f"{idx_path}: not a Megatron MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise IndexedDataError(f"{idx_path}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise IndexedDataError(f"{idx_path}: unknown dtype code {code}")
        expected = HEADER.size + 12 * n_seq + 8 * n_doc
        if size != expected:
            raise IndexedDataError(
                f"{idx_path}: {size} bytes, expected {expected} for {n_seq} sequences and "
                f"{n_doc - 1} documents (truncated or corrupt)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, n_seq, HEADER.size)
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, n_seq,
                                               HEADER.size + 4 * n_seq)
        self.document_indices = np.frombuffer(self._idx, np.int64, n_doc,
                                              HEADER.size + 12 * n_seq)
        bin_size = bin_path.stat().st_size
        tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        if bin_size != tokens * self.dtype.itemsize:
            raise IndexedDataError(f"{bin_path}: {bin_size} bytes, expected "
                                   f"{tokens * self.dtype.itemsize} (truncated or mismatched)")
        self._check_index(idx_path)
        self._bin = (np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size
                     else np.zeros(0, self.dtype))

    def _check_index(self, idx_path: Path, chunk: int = 1 << 22) -> None:
        """That the index's contents agree with one another (its sizes already do): every
        length >= 0, each pointer the byte offset where the lengths before it end, the
        document index from 0 to the sequence count without going back. Vectorised, in
        chunks (bounded memory); the first bad entry is one :class:`IndexedDataError`."""
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        item, offset = self.dtype.itemsize, 0
        for start in range(0, len(lengths), chunk):
            part = lengths[start:start + chunk].astype(np.int64)
            if (bad := np.flatnonzero(part < 0)).size:
                i = start + int(bad[0])
                raise IndexedDataError(f"{idx_path}: sequence {i} has length {lengths[i]} "
                                       "(corrupt index)")
            ends = offset + np.cumsum(part) * item
            expected = np.concatenate(([offset], ends[:-1]))
            if (bad := np.flatnonzero(pointers[start:start + chunk] != expected)).size:
                i = start + int(bad[0])
                raise IndexedDataError(
                    f"{idx_path}: sequence {i} starts at byte {pointers[i]}, but the lengths "
                    f"before it end at byte {expected[bad[0]]} (corrupt index)")
            offset = int(ends[-1])
        docs, n = self.document_indices, len(lengths)
        if docs.size == 0 or docs[0] != 0 or docs[-1] != n:
            first, last = (int(docs[0]), int(docs[-1])) if docs.size else (None, None)
            raise IndexedDataError(f"{idx_path}: the document index runs from {first} to "
                                   f"{last}, not from 0 to the {n} sequences (corrupt index)")
        if (bad := np.flatnonzero(np.diff(docs) < 0)).size:
            k = int(bad[0]) + 1
            raise IndexedDataError(f"{idx_path}: document index entry {k} ({docs[k]}) is below "
                                   f"the one before it ({docs[k - 1]}) (corrupt index)")

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def max_token(self, chunk: int = 1 << 24) -> int:
        """The largest token id in the shard (-1 when empty), read in chunks."""
        top = -1
        for start in range(0, self._bin.size, chunk):
            top = max(top, int(self._bin[start:start + chunk].max()))
        return top

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (a view into the map)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return self._bin[start:start + n]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def document(self, k: int) -> list[np.ndarray]:
        """The sequences of document ``k``."""
        lo, hi = self.document_indices[k], self.document_indices[k + 1]
        return [self.get(i) for i in range(lo, hi)]


def merge_indexed(prefixes: list[str | Path], out_prefix: str | Path) -> IndexedDataset:
    """Concatenate shards into one (Megatron's merge: documents keep their order).

    All inputs must share a dtype. The output is written atomically.
    """
    if not prefixes:
        raise IndexedDataError("nothing to merge: no input shards")
    shards = [IndexedDataset(p) for p in prefixes]
    writer = IndexedDatasetWriter(out_prefix, shards[0].dtype)
    try:
        for shard in shards:
            writer.add_shard(shard)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return IndexedDataset(out_prefix)
