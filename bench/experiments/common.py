"""What the paper experiments share: the demo's data, tiny runs, evaluation, results.md.

Each experiment (``bench/experiments/NAME.py``) trains small models on the Python standard
library's docstrings (built here, no download, cached under ``runs/experiments/data``),
prints its table, and replaces its own section of ``docs/results.md`` between
``<!-- NAME -->`` and ``<!-- /NAME -->``, with the command that regenerates it and the
machine it ran on. Plots go to ``docs/img/``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_lite.config import Config, load_config  # noqa: E402
from megatron_lite.files import atomic_write  # noqa: E402
from megatron_lite.parallel import ParallelContext  # noqa: E402
from megatron_lite.run import build_run  # noqa: E402
from megatron_lite.training.checkpoint import load_checkpoint  # noqa: E402
from megatron_lite.training.trainer import Trainer  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
IMG = ROOT / "docs" / "img"
OUT = ROOT / "runs" / "experiments"


def arguments(doc: str, steps: int) -> argparse.Namespace:
    """An experiment's command line: ``--steps`` (training steps per run, default ``steps``)."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps, help=f"steps per run (default {steps})")
    return p.parse_args()


def demo_data() -> dict[str, str]:
    """The demo's corpus, an 8k byte-level BPE and its shards (built once); data.* overrides."""
    from preprocessing.__main__ import main as preprocess
    from preprocessing.stdlib_corpus import write_corpus
    from preprocessing.train_tokenizer import train

    data = OUT / "data"
    prefix = data / "stdlib"
    tok = data / "tokenizer"
    if not Path(f"{prefix}_text_document.idx").exists():
        data.mkdir(parents=True, exist_ok=True)
        write_corpus(data / "corpus.jsonl")
        train([str(data / "corpus.jsonl")], "bpe", 8192, tok)
        assert preprocess(["--input", str(data / "corpus.jsonl"), "--output-prefix",
                           str(prefix), "--tokenizer-type", "GPT2BPETokenizer",
                           "--vocab-file", str(tok / "vocab.json"), "--merge-file",
                           str(tok / "merges.txt"), "--append-eod", "--quiet",
                           "--workers", "2"]) == 0
    return {"data.data_path": f"{prefix}_text_document",
            "data.tokenizer_type": "GPT2BPETokenizer",
            "data.vocab_file": str(tok / "vocab.json"), "data.merge_file": str(tok / "merges.txt")}


def train(name: str, overrides: dict) -> tuple[Path, list[dict], float]:
    """Train configs/gpt2/tiny-cpu.yaml at TP=1 with ``overrides`` into runs/experiments/NAME;
    returns (run dir, logged records, seconds)."""
    run_dir = OUT / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    over = {"parallel.tensor_parallel_size": 1, "train.run_dir": str(run_dir),
            "log.tensorboard": False, "train.save_interval": 0, **overrides}
    cfg = load_config(ROOT / "configs/gpt2/tiny-cpu.yaml", [f"{k}={v}" for k, v in over.items()])
    tick = time.perf_counter()
    records = Trainer(cfg, ParallelContext()).fit()
    return run_dir, records, time.perf_counter() - tick


def evaluate(run_dir: Path, overrides: list[str] | None = None, iters: int = 20,
             ckpt: Path | None = None) -> dict:
    """Validation metrics of a run's last checkpoint, or of ``ckpt`` (e.g. an average),
    with ``overrides`` (e.g. layers_to_keep)."""
    cfg: Config = load_config(run_dir / "config.yaml", overrides or [])
    cfg.train.eval_iters = iters
    ctx = ParallelContext()
    run = build_run(cfg, ctx, training=False)
    load_checkpoint(ckpt or run_dir, run.model, ctx)
    return run.evaluate("valid", iters)


def stream_eval(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Transformer-XL's evaluation protocol on a run's last checkpoint (``Run.evaluate_stream``),
    e.g. with ``["model.mem_len=256"]``."""
    cfg = load_config(run_dir / "config.yaml", overrides or [])
    ctx = ParallelContext()
    run = build_run(cfg, ctx, data=False)
    load_checkpoint(run_dir, run.model, ctx)
    return run.evaluate_stream("valid")


def save_figure(fig, name: str) -> Path:
    """Write a matplotlib figure to docs/img/NAME (atomically) and close it."""
    import matplotlib.pyplot as plt

    from megatron_lite.files import atomic_path

    IMG.mkdir(parents=True, exist_ok=True)
    with atomic_path(IMG / name) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return IMG / name


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) this experiment's section of docs/results.md."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Results: the seed papers' claims, re-measured on CPU\n\n"
        "Each section is written by `bench/experiments/NAME.py` (`make results` runs them "
        "all) and says the command that regenerates it and the machine it ran on. Tiny "
        "models, a few minutes of training: these check the direction of each paper's "
        "claim at a scale a laptop can run, not its numbers.\n")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + block + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(RESULTS) as f:
        f.write(text)
