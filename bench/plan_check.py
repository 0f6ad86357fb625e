"""The planner against reality: parameter counts of the Megatron-LM paper's models, and
predicted activation memory against what autograd keeps on this CPU.

    python bench/plan_check.py        # about a minute on 2 cores

Activations are measured by counting every distinct storage autograd saves for backward
in one forward (``megatron_lite.plan.measured_activation_bytes``), for tiny GPTs with
activation checkpointing none / selective / full, fp32 and bf16, at TP=1 and TP=2 (two
gloo processes); weights, gradients and optimizer state are exact from the parameter
counts. Prints one row per case with the ratio predicted / measured (the prediction of
what is saved after the forward; under ``full`` the planner adds one layer's activations
for the backward's recomputation on top).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lite.config import load_config  # noqa: E402
from megatron_lite.models import build_model  # noqa: E402
from megatron_lite.plan import (  # noqa: E402
    activation_bytes,
    count_parameters,
    measured_activation_bytes,
)
from tests.distributed import run_distributed  # noqa: E402

# the paper's Table 1 (GPT-2, vocab padded to 51,200) and its BERT models, as it rounds them
PAPER = {"gpt2/1.2b": 1.2e9, "gpt2/2.5b": 2.5e9, "gpt2/4.2b": 4.2e9, "gpt2/8.3b": 8.3e9,
         "bert/large": 336e6, "bert/1.3b": 1.3e9, "bert/3.9b": 3.9e9}
TINY = ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
        "model.seq_length=128", "model.max_position_embeddings=128", "model.vocab_size=1000",
        "model.make_vocab_size_divisible_by=8", "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1"]
# a second shape the terms were not counted on: h 256, 8 heads, seq 256, 2 layers
HELD_OUT = ["model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=8",
            "model.seq_length=256", "model.max_position_embeddings=256"]
CASES = [(shape, ck, prec, tp) for shape in ("counted", "held-out")
         for ck in ("none", "selective", "full") for prec in ("fp32", "bf16") for tp in (1, 2)]
MICRO_BATCH = 4


def _measure(ctx, overrides, out):
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, ctx)
    g = torch.Generator().manual_seed(0)
    shape = (MICRO_BATCH, cfg.model.seq_length)
    batch = {"input_ids": torch.randint(0, 1000, shape, generator=g),
             "labels": torch.randint(0, 1000, shape, generator=g)}
    got = measured_activation_bytes(model, batch, cfg.train.precision, ctx.device)
    if ctx.rank == 0:
        Path(out).write_text(str(got))


def activation_table(tmp: Path) -> list[dict]:
    rows = []
    for shape, ck, prec, tp in CASES:
        over = TINY + (HELD_OUT if shape == "held-out" else []) + [
            f"model.activation_checkpointing={ck}", f"train.precision={prec}",
            f"parallel.tensor_parallel_size={tp}"]
        out = tmp / f"{shape}-{ck}-{prec}-{tp}.txt"
        run_distributed(_measure, tp, over, str(out), tp_size=tp)
        measured = int(out.read_text())
        predicted = activation_bytes(load_config(None, over), tp, MICRO_BATCH)["saved"]
        rows.append({"shape": shape, "checkpointing": ck, "precision": prec, "tp": tp,
                     "measured": measured,
                     "predicted": predicted, "ratio": predicted / measured})
    return rows


def main() -> int:
    print("Megatron-LM paper's models (parameters at their TP, vocab padded):")
    for name, published in PAPER.items():
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        tp = cfg.parallel.tensor_parallel_size
        got = count_parameters(cfg, tp)["total"]
        print(f"  {name:<11} TP={tp}  {got / 1e9:7.3f} B   paper {published / 1e9:.3f} B   "
              f"({got / published - 1:+.1%})")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = activation_table(Path(tmp))
    print(f"\nactivations of one micro-batch of {MICRO_BATCH} sequences, dropout 0.1, per TP "
          "rank; counted: 4 layers, h 128, 4 heads, seq 128 (the shape the terms were counted "
          "on); held-out: 2 layers, h 256, 8 heads, seq 256:")
    print(f"  {'shape':<9} {'checkpointing':<13} {'precision':<9} {'TP':>2} {'measured':>12} "
          f"{'predicted':>12} {'ratio':>6}")
    for r in rows:
        print(f"  {r['shape']:<9} {r['checkpointing']:<13} {r['precision']:<9} {r['tp']:>2} "
              f"{r['measured'] / 2**20:>9.2f} MiB {r['predicted'] / 2**20:>8.2f} MiB "
              f"{r['ratio']:>6.3f}")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nlargest deviation: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
