import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from preprocessing.__main__ import main as preprocess_main
from preprocessing.stdlib_corpus import iter_documents
from preprocessing.train_tokenizer import train
from tests.distributed import run_distributed

# NOTE: one intra-op thread in the test process, as in every rank of the distributed tests:
# the tests' tiny models gain nothing from a second thread, and on a shared 2-core machine
# OpenMP's spinning threads made single-process training steps 5-10x slower under load
# (test_average_of_checkpoints: 7-10 s -> 0.8 s with another test run beside it).
torch.set_num_threads(1)
# NOTE: DeepSpeed JIT-builds a C++ op (its shm all-reduce) the first time a ZeRO test starts;
# torch caches builds in ~/.cache/torch_extensions, where checkouts with other venvs (other
# include paths) rebuild over each other, 40-80 s a time. One cache per venv keeps it built.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture
def distributed():
    """``distributed(fn, world_size, *args, tp_size=None)`` runs ``fn(ctx, *args)`` on gloo."""
    return run_distributed


@pytest.fixture(scope="session")
def stdlib_docs():
    """Real English text: stdlib docstrings, one document per module (>= 150 words)."""
    return [d["text"] for d in iter_documents() if len(d["text"].split()) >= 150]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, stdlib_docs):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for text in stdlib_docs[:120]:
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def bpe_files(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("bpe")
    train([str(corpus_file)], "bpe", 2000, out)
    return out / "vocab.json", out / "merges.txt"


@pytest.fixture(scope="session")
def wordpiece_file(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("wp")
    train([str(corpus_file)], "wordpiece", 2000, out)
    return out / "vocab.txt"


@pytest.fixture(scope="session")
def sentence_shard(tmp_path_factory, corpus_file, wordpiece_file):
    out = tmp_path_factory.mktemp("bert")
    assert preprocess_main(["--input", str(corpus_file), "--output-prefix", str(out / "c"),
                            "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                            str(wordpiece_file), "--split-sentences", "--quiet",
                            "--workers", "1"]) == 0
    return out / "c_text_sentence"


def mutate(text: str, fraction: float, seed: int) -> str:
    """Replace ``fraction`` of the words with words that do not occur in the text."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = f"zq{rng.randrange(10**9)}"
    return " ".join(words)
