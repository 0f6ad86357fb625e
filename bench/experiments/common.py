"""What the paper experiments share: the demo's data, tiny runs, evaluation, results.md.

Each experiment (``bench/experiments/NAME.py``) trains small models on the Python standard
library's docstrings (built here, no download, cached under ``runs/experiments/data``),
prints its table, and replaces its own section of ``docs/results.md`` between
``<!-- NAME -->`` and ``<!-- /NAME -->``, with the command that regenerates it and the
machine it ran on. Plots go to ``docs/img/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from evidence import RULE, SPREAD, VERDICTS, read_raw, write_raw  # noqa: E402

from megatron_lite.checkpoint import load_checkpoint  # noqa: E402
from megatron_lite.config import Config, load_config  # noqa: E402
from megatron_lite.files import atomic_write  # noqa: E402
from megatron_lite.parallel import ParallelContext  # noqa: E402
from megatron_lite.run import build_run  # noqa: E402
from megatron_lite.training import evaluation  # noqa: E402
from megatron_lite.training.trainer import Trainer  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
IMG = ROOT / "docs" / "img"
OUT = ROOT / "runs" / "experiments"


def arguments(doc: str, steps: int, lengths: tuple[int, int] | None = None,
              seeds: int = 2) -> argparse.Namespace:
    """An experiment's command line: ``--steps`` (training steps per run, default ``steps``),
    ``--seeds`` (seeds per compared configuration), ``--render-only`` (rewrite the section
    and plots from docs/results/NAME.json, no training), and ``--lengths SHORT LONG``
    where the experiment has two sequence lengths."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps, help=f"steps per run (default {steps})")
    p.add_argument("--seeds", type=int, default=seeds,
                   help=f"seeds per compared configuration (default {seeds})")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the section and its plots from the committed raw numbers")
    if lengths:
        p.add_argument("--lengths", type=int, nargs=2, default=lengths, metavar=("SHORT", "LONG"),
                       help=f"the two sequence lengths (default {lengths[0]} {lengths[1]})")
    return p.parse_args()


def run_experiment(name: str, doc: str, measure, render, steps: int, seeds: int = 2,
                   lengths: tuple[int, int] | None = None) -> None:
    """An experiment's main: parse its arguments, ``measure(args) -> raw`` (trains; per-seed
    figures), store the raw numbers in docs/results/NAME.json with the command, machine,
    minutes of this invocation and the training minutes of all its runs (those read back
    from an earlier, interrupted invocation too), then ``render(raw)`` (section of
    docs/results.md and plots, from the raw numbers alone). ``--render-only`` skips the
    measuring."""
    a = arguments(doc, steps, lengths, seeds)
    if a.render_only:
        raw = read_raw(name)
        if raw is None:
            sys.exit(f"docs/results/{name}.json does not exist: run the experiment first")
        render(raw)
        return
    start = time.time()
    raw = measure(a)
    argv = " ".join(sys.argv[1:])
    raw.update({"command": f"python bench/experiments/{name}.py {argv}".strip(),
                "machine": machine(), "minutes": round((time.time() - start) / 60, 1),
                "training_minutes_all_runs": round(sum(TRAINED_SECONDS) / 60, 1),
                "steps": a.steps, "seeds": a.seeds})
    write_raw(name, raw)
    render(raw)


def _shards(folder: str, kind: str, tokenizer_type: str, files: dict[str, str],
            split: str, extra: list[str], vocab: int = 8192) -> tuple[Path, dict[str, str]]:
    """The standard library's docstrings, a ``vocab``-token tokenizer of ``kind`` trained on
    them and their shards under runs/experiments/FOLDER (built once); returns (the shards' prefix,
    ``data.*_file`` overrides naming the tokenizer's ``files``)."""
    from preprocessing.__main__ import main as preprocess
    from preprocessing.stdlib_corpus import write_corpus
    from preprocessing.train_tokenizer import train

    data, tok = OUT / folder, OUT / folder / "tokenizer"
    prefix = data / "stdlib"
    named = {f"data.{key}": str(tok / name) for key, name in files.items()}
    if not Path(f"{prefix}_text_{split}.idx").exists():
        data.mkdir(parents=True, exist_ok=True)
        write_corpus(data / "corpus.jsonl")
        train([str(data / "corpus.jsonl")], kind, vocab, tok)
        flags = [arg for key, path in named.items()
                 for arg in ("--" + key[5:].replace("_", "-"), path)]
        assert preprocess(["--input", str(data / "corpus.jsonl"), "--output-prefix",
                           str(prefix), "--tokenizer-type", tokenizer_type, *flags, *extra,
                           "--quiet", "--workers", "2"]) == 0
    return Path(f"{prefix}_text_{split}"), {"data.tokenizer_type": tokenizer_type, **named}


def demo_data(vocab: int = 8192) -> dict[str, str]:
    """The demo's corpus, an 8k byte-level BPE and its shards (built once); data.* overrides.
    ``vocab=2048``: a 2k BPE instead, for small models whose step the 8k output layer
    would dominate (the experiments that need many seeds and steps)."""
    path, over = _shards("data" if vocab == 8192 else f"data-{vocab}", "bpe",
                         "GPT2BPETokenizer",
                         {"vocab_file": "vocab.json", "merge_file": "merges.txt"}, "document",
                         ["--append-eod"], vocab)
    return {"data.data_path": str(path), **over}


def bert_data(vocab: int = 8192) -> dict[str, str]:
    """The BERT demo's data: the same corpus, an 8k WordPiece (lower case) and sentence
    shards (built once); data.* overrides for configs/bert/tiny-cpu.yaml. ``vocab=2048``:
    a 2k WordPiece instead (see ``demo_data``)."""
    path, over = _shards("data-bert" if vocab == 8192 else f"data-bert-{vocab}", "wordpiece",
                         "BertWordPieceLowerCase", {"vocab_file": "vocab.txt"}, "sentence",
                         ["--split-sentences"], vocab)
    return {"data.data_path": str(path), **over}


# training seconds of every run this process used, read back or trained now: an experiment
# resumed from finished runs takes minutes, but its runs' cost is this sum
TRAINED_SECONDS: list[float] = []


def train(name: str, overrides: dict, config: str = "configs/gpt2/tiny-cpu.yaml",
          seed: int | None = None, make_trainer=Trainer) -> tuple[Path, list[dict], float]:
    """Train ``config`` (the demo's tiny GPT-2 by default) at TP=1 with ``overrides`` (and
    ``train.seed`` = ``seed``) into runs/experiments/NAME[-sSEED]; returns (run dir, logged
    records, seconds). A run that finished before with the same settings is not trained
    again (its records are read back), so an interrupted experiment resumes where it
    stopped; ``RESULTS_FORCE=1`` retrains. ``make_trainer(cfg, ctx)`` builds what
    ``fit()``s (e.g. the distillation trainer)."""
    run_dir = OUT / (name if seed is None else f"{name}-s{seed}")
    over = {"parallel.tensor_parallel_size": 1, "train.run_dir": str(run_dir),
            "log.tensorboard": False, "train.save_interval": 0, **overrides}
    if seed is not None:
        over["train.seed"] = seed
    over = {k: str(v) for k, v in over.items()}
    done = run_dir / "experiment.json"
    if done.exists() and not os.environ.get("RESULTS_FORCE"):
        stored = json.loads(done.read_text())
        if stored["overrides"] == over and stored["config"] == config:
            TRAINED_SECONDS.append(stored["seconds"])
            return run_dir, stored["records"], stored["seconds"]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = load_config(ROOT / config, [f"{k}={v}" for k, v in over.items()])
    tick = time.perf_counter()
    records = make_trainer(cfg, ParallelContext()).fit()
    seconds = time.perf_counter() - tick
    TRAINED_SECONDS.append(seconds)
    with atomic_write(done) as f:
        json.dump({"overrides": over, "config": config, "records": records,
                   "seconds": seconds}, f)
    return run_dir, records, seconds


def step_costs(arms: dict[str, dict], config: str = "configs/gpt2/tiny-cpu.yaml",
               steps: int = 20, warmup: int = 3, make_trainer: dict | None = None,
               cache: Path | None = None) -> dict[str, float]:
    """CPU seconds (process time) per training step of each arm (``{name: overrides}`` of
    ``config``, TP=1), measured in this process after ``warmup`` steps each, the arms
    alternated step by step: what the arms cost relative to each other, unlike wall time
    unaffected by other processes sharing the machine. ``make_trainer``: ``{name: factory}``
    for arms that are not a plain ``Trainer`` (e.g. the distillation trainer). ``cache``: a
    JSON file the costs are read from if it exists and written to otherwise, so that a
    resumed experiment keeps the costs its finished runs were sized with."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    trainers = {}
    for name, over in arms.items():
        over = {"parallel.tensor_parallel_size": 1, "log.tensorboard": False,
                "train.run_dir": str(OUT / "calibration" / name), "train.save_interval": 0,
                "train.eval_interval": 0, "train.max_steps": 10**6, **over}
        cfg = load_config(ROOT / config, [f"{k}={v}" for k, v in over.items()])
        trainers[name] = (make_trainer or {}).get(name, Trainer)(cfg, ParallelContext())
        for _ in range(warmup):
            trainers[name].train_step()
    spent = dict.fromkeys(arms, 0.0)
    for _ in range(steps):
        for name, trainer in trainers.items():
            tick = time.process_time()
            trainer.train_step()
            spent[name] += time.process_time() - tick
    costs = {name: total / steps for name, total in spent.items()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as f:
            json.dump(costs, f)
    return costs


def with_seeds(seeds: int, fn) -> list:
    """``[fn(seed) for seed in 1..seeds]``: one arm's per-seed results."""
    return [fn(seed) for seed in range(1, seeds + 1)]


def perplexity_curve(records: list[dict], global_batch: int, seq: int
                     ) -> tuple[list[tuple[float, float]], float]:
    """``[(training seconds so far, validation perplexity)]`` at each evaluation the trainer
    logged, and the run's training seconds; seconds from the throughput logged over each
    interval, so evaluation time is not counted."""
    curve, total, last = [], 0.0, 0
    for r in records:
        total += (r["step"] - last) * global_batch * seq / r["tokens_per_sec"]
        last = r["step"]
        if "val_loss" in r:
            curve.append((total, math.exp(r["val_loss"])))
    return curve, total


def plot_curves(curves: dict[str, list[tuple[float, float]]], title: str, name: str,
                mark: tuple[float, str] | None = None) -> Path:
    """Validation perplexity (log scale) against training time, one line per label, an
    optional vertical ``(x, label)`` mark; saved as docs/img/NAME."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        x, y = zip(*curve, strict=True)
        ax.plot(x, y, "o-", label=label)
    if mark:
        ax.axvline(mark[0], color="grey", linestyle=":", label=mark[1])
    ax.set_yscale("log")
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, name)


def evaluate(run_dir: Path, overrides: list[str] | None = None, iters: int = 20,
             ckpt: Path | None = None) -> dict:
    """Validation metrics of a run's last checkpoint, or of ``ckpt`` (e.g. an average),
    with ``overrides`` (e.g. layers_to_keep)."""
    cfg: Config = load_config(run_dir / "config.yaml", overrides or [])
    cfg.train.eval_iters = iters
    ctx = ParallelContext()
    run = build_run(cfg, ctx, training=False)
    load_checkpoint(ckpt or run_dir, run.model, ctx)
    return evaluation.evaluate(run, "valid", iters)


def stream_eval(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Transformer-XL's evaluation protocol on a run's last checkpoint
    (``evaluation.evaluate_stream``), e.g. with ``["model.mem_len=256"]``."""
    cfg = load_config(run_dir / "config.yaml", overrides or [])
    ctx = ParallelContext()
    run = build_run(cfg, ctx, data=False)
    load_checkpoint(run_dir, run.model, ctx)
    return evaluation.evaluate_stream(run, "valid")


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


# The seed papers, in the order of the contents table (toc entries name them by key).
PAPERS = {
    "megatron": "Megatron-LM (Shoeybi et al. 2019)",
    "bert": "BERT (Devlin et al. 2019)",
    "tips": "Training Tips for the Transformer Model (Popel & Bojar 2018)",
    "layerdrop": "LayerDrop (Fan et al. 2019)",
    "xl": "Transformer-XL (Dai et al. 2019)",
    "adaptive_span": "Adaptive attention span (Sukhbaatar et al. 2019)",
    "sandwich": "Sandwich transformer (Press et al. 2019)",
    "par": "PAR: Pay Attention when Required (Mandava et al. 2020)",
    "minilm": "MiniLM and MiniLMv2 (Wang et al. 2020, 2021)",
}
_INTRO = f"""# Results: the seed papers' claims, re-measured on CPU

Each section is written by `bench/experiments/NAME.py` (`make results` runs them all,
resumably; `make results-quick` rewrites this page and its plots from the committed raw
numbers in [`docs/results/`](results/) without training) and says the command that
regenerates it and the machine it ran on.

**What a CPU-scale check can show, and what it cannot.** The models here have 0.1-3 M
parameters and train for minutes on 2 CPU cores. That is enough to check the *direction*
of a claim whose mechanism works at any size (a memory that lets a model see further, a
span that stays short, a pruned stack that was trained to be pruned, a teacher that knows
more than its student), and to measure costs (time, memory, tokens) exactly. It cannot
show effects that the papers report only at scale or after long training (post-LN
instability in large models, a few percent of perplexity on WikiText-103): there a
verdict here says what happened at this scale and why it may differ, and the condition it
was measured under is part of the verdict. Where a synthetic task is used because the
mechanism is known to matter on it, the section says so.

**Evidence.** Every compared configuration runs at least 2 seeds (3 where the expected
effect is under ~5 %); figures are the mean over seeds with the {SPREAD} in brackets, and
arms that share a seed are also compared seed by seed (paired differences). {RULE}
"""
_TOC_LINE = re.compile(r"^<!-- toc (\{.*\}) -->$", re.M)


def write_section(name: str, markdown: str, toc: dict | list[dict] | None = None) -> None:
    """Replace (or append) this experiment's section of docs/results.md, and rebuild the
    contents table at the top of the page from every section's ``toc`` entries.

    ``toc``: per claim the section measures, ``{"paper": a PAPERS key, "claim": one line,
    "measured": one line (means and spread), "verdict": agrees | partly | disagrees |
    inconclusive, "condition": the scale it holds at (e.g. "at 0.4 M parameters, 1200
    steps"), "seeds": seeds per arm, "spread": what the brackets are}``; stored in the
    section as an HTML comment so that the table can be rebuilt when any one section is
    rerun.
    """
    entries = [toc] if isinstance(toc, dict) else list(toc or [])
    for e in entries:
        assert e["paper"] in PAPERS and e["verdict"] in VERDICTS, e
        assert e.get("seeds", 0) >= 2 and e.get("condition") and e.get("spread"), e
        e["section"] = name
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    comments = "".join(f"<!-- toc {json.dumps(e)} -->\n" for e in entries)
    block = f"{start}\n{comments}{markdown.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else _INTRO
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + block + "\n"
    text = _with_contents(_with_intro(text))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(RESULTS) as f:
        f.write(text)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _with_contents(text: str) -> str:
    """The page with its contents table (one row per seed paper) rebuilt from the toc
    comments of its sections, placed after the introduction."""
    rows: dict[str, list[dict]] = {key: [] for key in PAPERS}
    for match in _TOC_LINE.finditer(text):
        entry = json.loads(match.group(1))
        section = re.search(rf"<!-- {re.escape(entry['section'])} -->.*?^## (.+?)$", text,
                            re.S | re.M)
        entry["anchor"] = _anchor(section.group(1)) if section else ""
        rows[entry["paper"]].append(entry)
    table = ["| paper | claim | measured here | seeds | verdict |", "|---|---|---|---|---|"]
    for key, paper in PAPERS.items():
        found = rows[key]
        if not found:
            table.append(f"| {paper} | | not measured yet | | |")
            continue
        cells = [[], [], [], []]
        for e in found:
            cells[0].append(f"[{e['claim']}](#{e['anchor']})")
            cells[1].append(e["measured"])
            cells[2].append(str(e.get("seeds", 1)))
            cells[3].append(f"**{e['verdict']}** {e.get('condition', '(one seed; not rerun)')}")
        table.append(f"| {paper} | " + " | ".join("<br>".join(c) for c in cells) + " |")
    block = ("<!-- contents -->\n## Contents\n\nOne row per seed paper: the claim (linked to "
             f"its section), what was measured here (mean over seeds, the {SPREAD} in brackets), "
             "and the verdict by the rule above with the condition it holds under.\n\n"
             + "\n".join(table) + "\n<!-- /contents -->")
    pattern = re.compile(r"<!-- contents -->.*?<!-- /contents -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    head, sep, rest = text.partition("\n<!-- ")
    return head.rstrip() + "\n\n" + block + "\n" + (sep + rest if sep else "")


def _with_intro(text: str) -> str:
    """The page with today's introduction (everything before the first section marker)."""
    head, sep, rest = text.partition("\n<!-- ")
    return _INTRO.rstrip() + "\n" + (sep + rest if sep else "")
