"""A real English corpus every Python install carries: the standard library's docstrings.

    python -m preprocessing.stdlib_corpus --output corpus.jsonl

One document per stdlib source file (its module, class and function docstrings, read
with ``ast``: nothing is imported or executed) and one per ``pydoc`` help topic.
Deterministic for a given Python version. Used by the demo and the tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from megatron_lite.files import atomic_write

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
              "__pycache__", "ensurepip", "turtledemo"}


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc.strip())
    return out


def iter_documents() -> Iterator[dict]:
    """``{"text", "source"}`` records: stdlib docstrings by file, then pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath, name)
            try:
                docs = _docstrings(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            if docs:
                yield {"text": "\n\n".join(docs), "source": str(path.relative_to(root))}
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return
    for name in sorted(topics):
        yield {"text": topics[name].strip(), "source": f"pydoc:{name}"}


def write_corpus(path: str | Path) -> int:
    """Write the corpus as jsonl (atomically); returns the number of documents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_write(path) as f:
        for doc in iter_documents():
            f.write(json.dumps(doc) + "\n")
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    args = p.parse_args()
    n = write_corpus(args.output)
    print(f"{args.output}: {n} documents, {Path(args.output).stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
