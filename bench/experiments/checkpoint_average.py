"""Checkpoint averaging (Popel & Bojar 2018, "Training Tips for the Transformer Model").

    python bench/experiments/checkpoint_average.py [--steps 1200 --seeds 3]  # ~10 minutes, 1 thread

The paper's tip: averaging the parameters of the last few checkpoints (saved at regular
intervals while training goes on) gives a better model than the last checkpoint alone,
for free. The design gives the effect its chance: a small GPT-2 (4 layers, hidden 64,
seq 64, batch 8, the 2k BPE) trained at a *constant* learning rate after warmup (so the
checkpoints are noisy samples around where the optimiser sits, as in the paper, not the
end of a decay to min_lr), a checkpoint every 25 steps, and the average of the last 2 / 4
/ 8 (the last 50 / 100 / 200 steps) against the last checkpoint alone, all evaluated on
the same validation batches; 3 seeds, paired per seed.
"""

from __future__ import annotations

import math
import shutil

import evidence
from common import (
    OUT,
    demo_data,
    evaluate,
    load_config,
    run_experiment,
    save_figure,
    train,
    write_section,
)

from megatron_lite.checkpoint import list_checkpoints
from megatron_lite.checkpoint.average import average_checkpoints
from megatron_lite.plan import count_parameters

NAME = "checkpoint_average"
LASTS = (2, 4, 8)
EVERY = 25
ITERS = 40  # validation batches of 8 sequences
MODEL = {"model.num_layers": 4, "model.hidden_size": 64, "model.num_attention_heads": 4,
         "model.seq_length": 64, "model.max_position_embeddings": 64,
         "train.micro_batch_size": 8, "train.global_batch_size": 8,
         "optim.lr": 1e-3, "optim.decay_style": "constant", "optim.warmup_steps": 50}


def perplexity(run_dir, ckpt) -> float:
    return math.exp(evaluate(run_dir, iters=ITERS, ckpt=ckpt)["loss"])


def measure(a) -> dict:
    arms: dict[str, list[float]] = {"1": [], **{str(n): [] for n in LASTS}}
    seconds = []
    for seed in range(1, a.seeds + 1):
        run_dir, _, took = train(f"{NAME}/run", {
            **demo_data(2048), **MODEL, "train.max_steps": a.steps,
            "train.eval_interval": 0, "train.log_interval": 100,
            "train.save_interval": EVERY, "train.keep_checkpoints": max(LASTS)}, seed=seed)
        seconds.append(took)
        ckpts = list_checkpoints(run_dir)
        assert len(ckpts) >= max(LASTS), ckpts
        arms["1"].append(perplexity(run_dir, ckpts[-1]))
        for n in LASTS:
            target = OUT / NAME / f"avg-s{seed}-{n}"
            shutil.rmtree(target, ignore_errors=True)
            arms[str(n)].append(perplexity(run_dir, average_checkpoints(ckpts[-n:], target)))
        print(f"seed {seed}: last {arms['1'][-1]:.2f}, "
              + ", ".join(f"avg {n} {arms[str(n)][-1]:.2f}" for n in LASTS), flush=True)
    params = count_parameters(load_config(run_dir / "config.yaml"), 1)
    return {"perplexity": arms, "train_seconds": seconds,
            "params": params["total"] - params["embedding"], "params_total": params["total"],
            "every": EVERY, "iters": ITERS, "lasts": list(LASTS)}


def render(raw: dict) -> None:
    arms, every, steps = raw["perplexity"], raw["every"], raw["steps"]
    last = arms["1"]
    rows = ["| checkpoints | steps covered | validation perplexity | paired difference to the "
            "last one, per seed (%) | verdict (vs the last one) |", "|---|---|---|---|---|",
            f"| the last one alone (step {steps}) | - | {evidence.show(last, 2)} | - | - |"]
    verdicts, diffs = {}, {}
    for n in raw["lasts"]:
        values = arms[str(n)]
        diffs[n] = [100 * d / b for d, b in zip(evidence.paired(values, last), last,
                                                  strict=True)]
        verdicts[n] = evidence.compare(values, last)
        rows.append(f"| average of the last {n} | {steps - (n - 1) * every}-{steps} | "
                    f"{evidence.show(values, 2)} | "
                    f"{', '.join(f'{d:+.2f}' for d in diffs[n])} | {verdicts[n]} |")
    verdict = evidence.combine(list(verdicts.values()))
    better = {n for n, d in diffs.items() if all(x < 0 for x in d)}
    reading = (f"Paired by seed, the average is better than the last checkpoint on every seed "
               f"for N = {', '.join(map(str, sorted(better)))}"
               if better else "Paired by seed, no average is better than the last checkpoint "
               "on every seed")
    reading += (". Between seeds the perplexity of the last checkpoint itself ranges "
                f"{min(last):.2f}-{max(last):.2f}; the verdict by the rule compares the arms' "
                "ranges over seeds, so a paired gain smaller than that spread stays "
                "*inconclusive* even when every seed shows it.")
    _plot(diffs, raw["lasts"], every)
    seeds = len(last)
    condition = (f"at {raw['params'] / 1e6:.2f} M non-embedding parameters, constant lr, "
                 f"{steps} steps, checkpoints {every} steps apart")
    write_section(NAME, f"""
## Checkpoint averaging (Popel & Bojar 2018, training tips)

Claim: averaging the parameters of the last few checkpoints beats the last checkpoint
alone. Design: a small GPT-2 (4 layers, hidden 64, 4 heads, seq 64, batch 8, 2k BPE on
the standard library's docstrings, dropout 0.1) trained {steps} steps at a **constant**
learning rate 1e-3 after 50 warmup steps, a checkpoint every {every} steps; the last
checkpoint against `average_checkpoints` of the last 2 / 4 / 8 (the last {every} to
{7 * every} steps of training), all on the same {raw['iters']} validation batches of 8
sequences. Why it can show the effect: at a constant learning rate the last checkpoints
are noisy iterates around the same region (the paper averages while training goes on),
so averaging can cancel the noise; the earlier design averaged checkpoints 10 % of
training apart, at the minimum learning rate, while the loss still fell fast. {seeds}
seeds ({evidence.SPREAD}), the averages paired with their own seed's last checkpoint.
Command: `{raw['command']}` ({raw['minutes']} min, training
{evidence.show(raw['train_seconds'], 0)} s per seed). Machine: {raw['machine']}.

{chr(10).join(rows)}

{reading}

What it can show: whether averaging the iterates of one constant-learning-rate run helps
a small model at this stage of training. What it cannot: the paper's setting (hours of
training near convergence, BLEU of a translation model); with a decaying schedule the last
checkpoint is already an implicit average and the gain is expected to shrink.

![paired perplexity change of the averages](img/checkpoint_average.png)
""", toc={"paper": "tips", "claim": "averaging the last checkpoints beats the last one",
          "measured": f"perplexity: last {evidence.show(last, 1)}, averages of the last "
                      + ", ".join(f"{n}: {evidence.show(arms[str(n)], 1)}"
                                  for n in raw["lasts"])
                      + "; paired change per seed (%): "
                      + ", ".join(f"{n}: {_signed(diffs[n])}" for n in raw["lasts"]),
          "verdict": verdict, "condition": condition, "seeds": seeds,
          "spread": evidence.SPREAD})


def _signed(values: list[float]) -> str:
    """``mean (min to max)`` with signs, for differences."""
    s = evidence.summary(values)
    return f"{s['mean']:+.1f} ({s['min']:+.1f} to {s['max']:+.1f})"


def _plot(diffs: dict[int, list[float]], lasts: list[int], every: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, n in enumerate(lasts):
        ax.plot([i] * len(diffs[n]), diffs[n], "o", color="C0", alpha=0.7)
        ax.plot([i - 0.2, i + 0.2], [sum(diffs[n]) / len(diffs[n])] * 2, color="C1")
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xticks(range(len(lasts)),
                  [f"last {n}\n(span {(n - 1) * every} steps)" for n in lasts])
    ax.set_ylabel("perplexity change vs last checkpoint (%)")
    ax.set_title("Averaging checkpoints: per seed (dots), mean (line)")
    fig.tight_layout()
    save_figure(fig, "checkpoint_average.png")


if __name__ == "__main__":
    run_experiment(NAME, __doc__, measure, render, steps=1200, seeds=3)
