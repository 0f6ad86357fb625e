"""Merge indexed shards into one, as Megatron's ``tools/merge_datasets.py`` does.

    python -m preprocessing.merge --input a_text_document b_text_document \\
        --output-prefix all_text_document

Documents keep their order (all of the first shard, then the second, ...); the
output is written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys

from megatron_lite.cli import run_cli
from megatron_lite.data.indexed import merge_indexed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocessing.merge",
                                description="Concatenate .bin/.idx shards.")
    p.add_argument("--input", nargs="+", required=True, help="shard prefixes, in order")
    p.add_argument("--output-prefix", required=True)
    a = p.parse_args(argv)

    def body() -> None:
        merged = merge_indexed(a.input, a.output_prefix)
        print(f"{a.output_prefix}: {merged.num_documents} documents, {merged.num_tokens} tokens")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
