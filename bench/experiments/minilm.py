"""MiniLM / MiniLMv2 (Wang et al. 2020): does a distilled student beat one trained alone?

    python bench/experiments/minilm.py [--steps 400]      # ~20 minutes on 2 CPU cores

The papers' claim: a small student that learns the teacher's last-layer self-attention
relations (task-agnostic) is a better model than the same student trained from scratch.
Here, for BERT (the papers' setting) and for a causal GPT (the seed's question: does it
work for masked attention in decoders?): a tiny teacher (4 layers, h 128, 4 heads)
trained ``steps`` steps; students of half the layers and half the hidden size (2 layers,
h 64, 4 heads). MiniLM / MiniLMv2 students: ``steps / 2`` steps of relation distillation,
then ``steps / 2`` steps of the ordinary loss from those weights (``train.finetune``:
the task-agnostic student gets its output head trained); the from-scratch student trains
on the ordinary loss for the same wall time as the MiniLMv2 student's two phases. All on
the demo's data (stdlib docstrings), validation on the same batches.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from common import OUT, ROOT, arguments, demo_data, machine, write_section

from megatron_lite.checkpoint import load_checkpoint
from megatron_lite.config import load_config
from megatron_lite.experiments.distill import distiller
from megatron_lite.parallel import ParallelContext
from megatron_lite.run import build_run
from megatron_lite.training import evaluation
from megatron_lite.training.trainer import Trainer

STUDENT = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4}
ITERS = 20
MARGIN = 0.02  # nats: a distilled student "wins" when its loss is lower by more than this


def bert_data() -> dict:
    """An 8k WordPiece and --split-sentences shards of the demo corpus (built once)."""
    from preprocessing.__main__ import main as preprocess
    from preprocessing.train_tokenizer import train

    demo_data()  # the corpus
    data = OUT / "data"
    prefix = data / "bert"
    if not Path(f"{prefix}_text_sentence.idx").exists():
        train([str(data / "corpus.jsonl")], "wordpiece", 8192, data / "wordpiece")
        assert preprocess(["--input", str(data / "corpus.jsonl"), "--output-prefix",
                           str(prefix), "--tokenizer-type", "BertWordPieceLowerCase",
                           "--vocab-file", str(data / "wordpiece" / "vocab.txt"),
                           "--split-sentences", "--quiet", "--workers", "2"]) == 0
    return {"data.data_path": f"{prefix}_text_sentence",
            "data.tokenizer_type": "BertWordPieceLowerCase",
            "data.vocab_file": str(data / "wordpiece" / "vocab.txt")}


def run(kind: str, name: str, over: dict, distil: bool = False) -> tuple[Path, float]:
    run_dir = OUT / "minilm" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = ROOT / "configs" / ("bert" if kind == "bert" else "gpt2") / "tiny-cpu.yaml"
    base = {"parallel.tensor_parallel_size": 1, "train.run_dir": str(run_dir),
            "log.tensorboard": False, "train.save_interval": 0, "train.eval_interval": 0,
            "train.log_interval": 50, **(bert_data() if kind == "bert" else demo_data())}
    cfg = load_config(config, [f"{k}={v}" for k, v in {**base, **over}.items()])
    trainer = (distiller if distil else Trainer)(cfg, ParallelContext())
    tick = time.perf_counter()  # the training loop only: not the start (data index, teacher)
    trainer.fit()
    return run_dir, time.perf_counter() - tick


def evaluate(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    ctx = ParallelContext()
    r = build_run(cfg, ctx, training=False)
    load_checkpoint(run_dir, r.model, ctx)
    out = evaluation.evaluate(r, "valid", ITERS)
    tick = time.perf_counter()
    evaluation.evaluate(r, "valid", ITERS)
    out["eval_seconds"] = time.perf_counter() - tick
    return out


def one(kind: str, steps: int) -> dict:
    half = steps // 2
    teacher, t_teacher = run(kind, f"{kind}-teacher", {"train.max_steps": steps})
    results = {"teacher": (evaluate(teacher), t_teacher)}
    v2_seconds = 0.0
    for method in ("minilm", "minilmv2"):
        distilled, t1 = run(kind, f"{kind}-{method}-distil", {
            **STUDENT, "train.max_steps": half, "distill.teacher": str(teacher),
            "distill.method": method}, distil=True)
        student, t2 = run(kind, f"{kind}-{method}", {
            **STUDENT, "train.max_steps": steps - half, "train.load": str(distilled),
            "train.finetune": True})
        results[method] = (evaluate(student), t1 + t2)
        v2_seconds = t1 + t2
    probe, t_probe = run(kind, f"{kind}-probe", {**STUDENT, "train.max_steps": 40})
    scratch_steps = max(int(v2_seconds / (t_probe / 40)), 40)
    scratch, t_scratch = run(kind, f"{kind}-scratch", {**STUDENT,
                                                       "train.max_steps": scratch_steps})
    results["scratch"] = (evaluate(scratch), t_scratch)
    results["scratch_steps"] = scratch_steps
    return results


def table(kind: str, results: dict, steps: int) -> list[str]:
    bert = kind == "bert"
    head = "| model | steps | wall s | val MLM loss | MLM acc | NSP acc |" if bert else \
        "| model | steps | wall s | val loss | val ppl |"
    rows = [head, "|---|---|---|---|---|---|" if bert else "|---|---|---|---|---|"]
    names = {"teacher": f"teacher (4L h128), {steps} steps",
             "minilm": f"MiniLM student: {steps // 2} distil + {steps - steps // 2} own",
             "minilmv2": f"MiniLMv2 student: {steps // 2} distil + {steps - steps // 2} own",
             "scratch": "student from scratch, same wall time"}
    for key, label in names.items():
        r, seconds = results[key]
        n = results["scratch_steps"] if key == "scratch" else steps
        if bert:
            rows.append(f"| {label} | {n} | {seconds:.0f} | {r['mlm_loss']:.3f} | "
                        f"{r['mlm_accuracy']:.3f} | {r['nsp_accuracy']:.3f} |")
        else:
            rows.append(f"| {label} | {n} | {seconds:.0f} | {r['loss']:.3f} | "
                        f"{math.exp(r['loss']):.1f} |")
    return rows


def main() -> None:
    a = arguments(__doc__, steps=400)
    start = time.time()
    out = {kind: one(kind, a.steps) for kind in ("bert", "gpt")}
    sections, measured, wins = [], [], []
    for kind, results in out.items():
        key = "mlm_loss" if kind == "bert" else "loss"
        score = {k: results[k][0][key] for k in ("minilm", "minilmv2", "scratch")}
        best = min(score, key=score.get)
        speed = results["teacher"][0]["eval_seconds"] / results["scratch"][0]["eval_seconds"]
        verdict = (f"best student: {best} ({score[best]:.3f}; from scratch {score['scratch']:.3f}"
                   f", MiniLM {score['minilm']:.3f}, MiniLMv2 {score['minilmv2']:.3f}); "
                   f"the student evaluates {speed:.1f}x faster than the teacher")
        print(kind, verdict, flush=True)
        wins.append(min(score["minilm"], score["minilmv2"]) < score["scratch"] - MARGIN)
        measured.append(f"{kind.upper()}: scratch {score['scratch']:.3f} vs MiniLM "
                        f"{score['minilm']:.3f} / v2 {score['minilmv2']:.3f} "
                        f"{'MLM loss' if kind == 'bert' else 'loss'}")
        sections.append(f"**{'BERT (MLM + NSP)' if kind == 'bert' else 'GPT (causal)'}**: "
                        f"{verdict}.\n\n" + "\n".join(table(kind, results, a.steps)) + "\n")
    minutes = (time.time() - start) / 60
    write_section("minilm", f"""
## MiniLM and MiniLMv2: self-attention distillation (Wang et al. 2020)

Claim: a student that learns the teacher's last-layer self-attention relations is better
than the same student trained alone. Regenerate: `python bench/experiments/minilm.py
--steps {a.steps}` ({minutes:.0f} min; {machine()}). Teacher: the tiny configs (4 layers,
h 128, 4 heads), {a.steps} steps; students: 2 layers, h 64, 4 heads. A distilled student
learns the relations for half the steps, then its own loss for the other half from those
weights (`train.finetune`, so its output head is trained); the from-scratch student gets
the training-loop time of the MiniLMv2 student's two phases (wall s: the loops, not the
starts). Validation: the same {ITERS} batches.
MiniLMv2 uses the student's 4 heads as relation heads and the teacher's last layer. One
seed each.

{chr(10).join(sections)}
""", toc={"paper": "minilm", "claim": "a student distilled from the teacher's self-attention "
                                   "relations beats the same student trained alone",
          "measured": "; ".join(measured),
          "verdict": "agrees" if all(wins) else "partly" if any(wins) else "disagrees"})


if __name__ == "__main__":
    main()
