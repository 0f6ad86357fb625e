"""Stream documents out of jsonl / jsonl.gz / json / parquet / txt files and folders.

Each reader yields :class:`Record` items in file order, one document at a time (a
parquet file is read row group by row group), so memory does not grow with the corpus.
Recoverable problems (a malformed JSON line, an empty text, a record without the
``--json-keys`` field among records that have it) come out as records with ``error``
set, so the caller counts and reports them; unrecoverable ones (a file in which no record
has the field, a parquet file without the column) raise :class:`InputError` naming the
key and the file.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")
TXT_DOCS = ("file", "blank-line")


class InputError(ValueError):
    """Input that cannot be processed at all (the message names the file)."""


@dataclass
class Record:
    text: str | None
    where: str  # "file:line" or "file:row"
    nbytes: int = 0
    error: str | None = None  # "malformed_json", "missing_key", "not_a_string", "empty"
    replaced: bool = False  # non-UTF-8 bytes were decoded with U+FFFD


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files named, plus supported files found (recursively, sorted) in folders named."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            files.extend(found)
        elif p.is_file():
            if not _kind(p):
                raise InputError(f"{p}: unsupported input type (use {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    if not files:
        raise InputError(f"no input files found in {', '.join(paths)} "
                         f"(looked for {', '.join(SUFFIXES)})")
    return files


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


class _KeyCheck:
    """Counts a file's records without the key; raises when none of them has it."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.with_key, self.first_keys = path, key, 0, None

    def record(self, obj, where: str, nbytes: int, replaced: bool) -> Record:
        if not isinstance(obj, dict):
            return Record(None, where, nbytes, "malformed_json", replaced)
        if self.key not in obj:
            if self.first_keys is None:
                self.first_keys = list(obj)[:8]
            return Record(None, where, nbytes, "missing_key", replaced)
        self.with_key += 1
        return _from_object(obj, self.key, where, nbytes, replaced)

    def done(self) -> None:
        if self.with_key == 0 and self.first_keys is not None:
            raise InputError(f"{self.path}: no record has the key {self.key!r} (use --json-keys "
                             "to name the text field; keys of its first record: "
                             f"{', '.join(map(str, self.first_keys))})")


def _from_object(obj: dict, key: str, where: str, nbytes: int, replaced: bool) -> Record:
    text = obj[key]
    if not isinstance(text, str):
        return Record(None, where, nbytes, "not_a_string", replaced)
    return Record(text, where, nbytes, None if text.strip() else "empty", replaced)


def _lines(path: Path) -> Iterator[bytes]:
    """The raw lines of a text or gzip file; a gzip stream that is not one, or ends early,
    is one :class:`InputError` naming the file (the lines before it were read)."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            yield from f
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise InputError(f"{path}: not a complete gzip file ({err})") from None


def _read_jsonl(path: Path, key: str) -> Iterator[Record]:
    check = _KeyCheck(path, key)
    for lineno, raw in enumerate(_lines(path), 1):
        if not raw.strip():
            continue
        line, replaced = _decode(raw)
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # nested past Python's stack: skipped
            yield Record(None, where, len(raw), "malformed_json", replaced)
            continue
        yield check.record(obj, where, len(raw), replaced)
    check.done()


def _read_json(path: Path, key: str) -> Iterator[Record]:
    raw = path.read_bytes()
    head = raw.lstrip()[:1]
    if head != b"[":  # one object per line, under a .json name
        yield from _read_jsonl(path, key)
        return
    text, replaced = _decode(raw)
    try:
        items = json.loads(text)  # NOTE: a JSON array is parsed whole; prefer jsonl for big data
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: invalid JSON array ({err.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None
    check = _KeyCheck(path, key)
    for i, obj in enumerate(items):
        yield check.record(obj, f"{path}:[{i}]", len(raw) // max(len(items), 1), replaced)
    check.done()


def _read_parquet(path: Path, key: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise InputError(f"{path}: no column {key!r} (use --json-keys; columns: "
                         f"{', '.join(names[:8])})")
    kind = pf.schema_arrow.field(key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: column {key!r} holds {kind}, not text (--json-keys names "
                         "text columns); no output written")
    row = 0
    for group in range(pf.num_row_groups):
        for text in pf.read_row_group(group, columns=[key]).column(0).to_pylist():
            where = f"{path}:row {row}"
            row += 1
            if not isinstance(text, str):
                yield Record(None, where, 0, "not_a_string")
            else:
                yield Record(text, where, len(text.encode("utf-8")), None if text.strip()
                             else "empty")


def _read_txt(path: Path) -> Iterator[Record]:
    raw = path.read_bytes()
    text, replaced = _decode(raw)
    yield Record(text, str(path), len(raw), None if text.strip() else "empty", replaced)


def _read_txt_blocks(path: Path) -> Iterator[Record]:
    """One document per block of non-blank lines; ``where`` is the block's first line."""
    text, replaced = _decode(path.read_bytes())
    block, start = [], 0
    for n, line in enumerate([*text.split("\n"), ""], 1):  # a sentinel blank line ends it
        if line.strip():
            start = start if block else n
            block.append(line)
        elif block:
            doc = "\n".join(block)
            yield Record(doc, f"{path}:{start}", len(doc.encode("utf-8")), None,
                         replaced and "\ufffd" in doc)
            block = []


def read_documents(files: list[Path], key: str = "text",
                   txt_docs: str = "file") -> Iterator[Record]:
    """Every document of every file, in order.

    ``txt_docs``: a ``.txt`` file is one document (``file``) or one per block of lines
    between blank lines (``blank-line``).
    """
    if txt_docs not in TXT_DOCS:
        raise InputError(f"txt_docs={txt_docs!r} is not one of {', '.join(TXT_DOCS)}")
    for path in files:
        kind = _kind(path)
        if kind in (".jsonl", ".jsonl.gz"):
            yield from _read_jsonl(path, key)
        elif kind == ".json":
            yield from _read_json(path, key)
        elif kind == ".parquet":
            yield from _read_parquet(path, key)
        elif txt_docs == "blank-line":
            yield from _read_txt_blocks(path)
        else:
            yield from _read_txt(path)


def total_bytes(files: list[Path]) -> int:
    return sum(os.path.getsize(f) for f in files)
