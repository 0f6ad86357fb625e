"""Batch size (Popel & Bojar 2018, "Training Tips for the Transformer Model", section 4.6).

    python bench/experiments/tips_batch_size.py [--steps 600]   # ~14 minutes on 2 CPU cores

The paper's tip: "batch size should be set as high as possible" — on GPUs a bigger batch
processes more tokens per second and, at a fitting learning rate, reaches a given BLEU
sooner in wall-clock time. Here: the demo's tiny GPT-2 at three global batch sizes in
tokens (``train.global_batch_tokens``: 1k, 4k, 16k tokens = 8, 32, 128 sequences) with
the largest micro-batch that fits a 2 GiB budget (``train.micro_batch_size=auto``: the
batch-size probe), the same number of tokens each (``--steps`` steps at the smallest
batch), each at three learning rates around the square-root rule from the demo's tuned
1e-3 at 16 sequences (x0.5, x1, x2); the best learning rate per batch size is kept.
Validation perplexity against training wall time (evaluation excluded), on the same 256
validation sequences for every run.
"""

from __future__ import annotations

import math
import time

from common import (
    arguments,
    demo_data,
    evaluate,
    load_config,
    machine,
    perplexity_curve,
    plot_curves,
    train,
    write_section,
)

TOKENS = (1024, 4096, 16384)  # global batch in tokens (seq 128: 8, 32, 128 sequences)
SEQ = 128
BASE_LR, BASE_BATCH = 1e-3, 16
FACTORS = (0.5, 1.0, 2.0)
EVAL_SAMPLES = 256
EVALS = 8


def main() -> None:
    a = arguments(__doc__, steps=600)
    start = time.time()
    total_tokens = a.steps * TOKENS[0]
    best: dict[int, dict] = {}
    tried: dict[int, dict[float, float]] = {}
    for tokens in TOKENS:
        batch = tokens // SEQ
        steps = total_tokens // tokens
        tried[batch] = {}
        for factor in FACTORS:
            lr = BASE_LR * math.sqrt(batch / BASE_BATCH) * factor
            run_dir, records, seconds = train(f"tips_batch_size/b{batch}-lr{lr:.1e}", {
                **demo_data(), "train.global_batch_tokens": tokens,
                "train.micro_batch_size": "auto", "train.memory_budget": "2GiB",
                "train.max_steps": steps, "train.log_interval": max(steps // EVALS, 1),
                "train.eval_interval": max(steps // EVALS, 1),
                "train.eval_iters": EVAL_SAMPLES // batch, "optim.lr": lr,
                "optim.min_lr": lr / 10, "optim.warmup_steps": max(steps // 20, 2)})
            final = math.exp(evaluate(run_dir, iters=EVAL_SAMPLES // batch)["loss"])
            tried[batch][lr] = final
            curve, seconds = perplexity_curve(records, batch, SEQ)
            micro = load_config(run_dir / "config.yaml").train.micro_batch_size
            print(f"batch {batch:3d} ({tokens} tokens) lr {lr:.1e}: validation perplexity "
                  f"{final:.1f}, {seconds:.0f} s training, {len(curve)} evaluations",
                  flush=True)
            if batch not in best or final < best[batch]["ppl"]:
                best[batch] = {"lr": lr, "ppl": final, "curve": curve, "seconds": seconds,
                               "steps": steps, "tokens_per_sec": total_tokens / seconds,
                               "micro": micro}
    plot_curves({f"{b} sequences, lr {r['lr']:.1e}": r["curve"] for b, r in best.items()},
                "Same tokens, three batch sizes (best lr each)", "tips_batch_size.png")
    rows = ["| global batch (tokens / sequences) | micro-batch (probed) | steps | best lr "
            "(validation perplexity at each lr tried) | validation perplexity | training time "
            "| tokens/s |", "|---|---|---|---|---|---|---|"]
    for batch, r in best.items():
        lrs = ", ".join(f"{lr:.1e}: {p:.1f}" for lr, p in tried[batch].items())
        rows.append(f"| {batch * SEQ} / {batch} | {r['micro']} | {r['steps']} | "
                    f"{r['lr']:.1e} ({lrs}) | {r['ppl']:.1f} | {r['seconds']:.0f} s | "
                    f"{r['tokens_per_sec']:.0f} |")
    batches = list(best)
    ppl = [best[b]["ppl"] for b in batches]
    speed = [best[b]["tokens_per_sec"] for b in batches]
    largest_best = min(batches, key=lambda b: best[b]["ppl"]) == batches[-1]
    smallest_best = min(batches, key=lambda b: best[b]["ppl"]) == batches[0]
    verdict = "agrees" if largest_best else ("disagrees" if smallest_best else "partly")
    measured = (f"same tokens: perplexity {' / '.join(f'{p:.0f}' for p in ppl)} at batch "
                f"{' / '.join(str(b) for b in batches)} sequences, tokens/s "
                f"{' / '.join(f'{s:.0f}' for s in speed)}")
    reading = (f"With the same tokens, throughput goes {speed[0]:.0f} -> {speed[-1]:.0f} "
               f"tokens/s from the smallest to the largest batch ({speed[-1] / speed[0]:.2f}x) "
               f"and validation perplexity {ppl[0]:.1f} -> {ppl[-1]:.1f}.")
    reading += {"agrees": " The largest batch is best in the same budget: the tip holds here.",
                "partly": " Neither end wins outright: a middle batch size is best here.",
                "disagrees": " The smallest batch is best in the same budget: the largest "
                             f"processes {speed[-1] / speed[0]:.2f}x the tokens per second of "
                             f"the smallest but makes {batches[-1] // batches[0]}x fewer "
                             "optimizer updates with the same tokens, and at this scale the "
                             "updates matter more. The tip rests on hardware whose throughput "
                             "grows with the batch far more than a 2-core CPU's (the paper's "
                             "GPUs)."}[verdict]
    edge = [b for b in batches if best[b]["lr"] in (min(tried[b]), max(tried[b]))]
    if edge:
        which = "that batch" if len(edge) == 1 else "those batches"
        reading += (f" The best learning rate is at an end of the range tried for batch "
                    f"{' and '.join(map(str, edge))} sequences, so {which} may do better at "
                    "a learning rate outside it.")
    write_section("tips_batch_size", f"""
## Batch size as high as possible (Popel & Bojar 2018, training tips)

Claim: "batch size should be set as high as possible": at a fitting learning rate a
bigger batch reaches a given quality sooner in wall-clock time. Here: the demo's tiny GPT-2
(4 layers, h 128, seq 128, 8k BPE on the standard library's docstrings), global batches
of {', '.join(str(t) for t in TOKENS)} tokens (`train.global_batch_tokens`, micro-batch
found by the batch-size probe in 2 GiB), the same {total_tokens:,} tokens each, cosine
schedule, warmup 5 % of the steps; three learning rates per batch size around the
square-root rule from the tuned 1e-3 at 16 sequences, the best kept; validation
perplexity on the same {EVAL_SAMPLES} sequences; TP=1. Command: `python
bench/experiments/tips_batch_size.py --steps {a.steps}` ({(time.time() - start) / 60:.0f}
min). Machine: {machine()}. One seed.

{chr(10).join(rows)}

{reading}

![validation perplexity vs training time](img/tips_batch_size.png)
""", toc={"paper": "tips", "claim": "batch size as high as possible", "measured": measured,
          "verdict": verdict})


if __name__ == "__main__":
    main()
