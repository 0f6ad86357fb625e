"""Transformer-XL (Dai et al. 2019): relative positions and segment memory, on CPU.

    python bench/experiments/xl.py [--steps 1200]     # ~8 minutes on 2 CPU cores

The paper's claim: with segment-level recurrence and relative positions, a model uses
context beyond its segment, and more memory at evaluation helps (the sinusoid relative
encodings generalise to distances longer than trained with). Three tiny GPTs trained for
the same steps on the demo's data with consecutive ordering (each batch row continues
its previous segment), segments of 64 tokens: (A) learned positions, no memory;
(B) relative positions, no memory; (C) relative positions, memory = 64. Each is
evaluated by the XL protocol (the whole validation stream in consecutive segments,
every token predicted once) with memory 0, 64 and 256 (A only without: it cannot read
a memory).
"""

from __future__ import annotations

import time

from common import arguments, demo_data, machine, save_figure, stream_eval, train, write_section

SEG = 64
MEMORIES = (0, 64, 256)


def main() -> None:
    a = arguments(__doc__, steps=1200)
    start = time.time()
    common = {**demo_data(), "train.max_steps": a.steps, "train.eval_interval": 0,
              "train.log_interval": 20, "model.seq_length": SEG,
              "model.max_position_embeddings": SEG, "data.ordering": "consecutive"}
    runs = {
        "A learned, no memory": {},
        "B relative, no memory": {"model.position_embedding": "relative"},
        "C relative, memory 64": {"model.position_embedding": "relative", "model.mem_len": SEG},
    }
    table, curves = {}, {}
    for name, over in runs.items():
        run_dir, records, seconds = train(f"xl/{name[0]}", {**common, **over})
        curves[name] = [(r["step"], r["loss"]) for r in records]
        mems = MEMORIES if "relative" in name else (0,)
        table[name] = ({m: stream_eval(run_dir, [f"model.mem_len={m}"]) for m in mems},
                       seconds)
        print(name, {m: round(r["perplexity"], 1) for m, r in table[name][0].items()},
              f"({seconds:.0f} s)", flush=True)
    _plot(curves, table)
    header = " | ".join(f"memory {m} at evaluation" for m in MEMORIES)
    rows = [f"| model | train time | {header} |", "|---|---|" + "---|" * len(MEMORIES)]
    for name, (res, seconds) in table.items():
        cells = [f"{res[m]['perplexity']:.1f}" if m in res else "n/a" for m in MEMORIES]
        rows.append(f"| {name} | {seconds:.0f} s | " + " | ".join(cells) + " |")
    ppl = {n: {m: r["perplexity"] for m, r in res.items()} for n, (res, _) in table.items()}
    a_, b_, c_ = (ppl[n] for n in runs)
    best_c = min(c_.values())
    claim = (f"C with its training memory (64) reaches {c_[64]:.1f} against {a_[0]:.1f} (A) and "
             f"{b_[0]:.1f} (B, no memory); C by evaluation memory 0 / 64 / 256: "
             f"{c_[0]:.1f} / {c_[64]:.1f} / {c_[256]:.1f}. B given a memory it never trained "
             f"with: {b_[64]:.1f} / {b_[256]:.1f} at 64 / 256.")
    beats = c_[64] < min(a_[0], b_[0])
    grows = c_[256] <= c_[64] <= c_[0]
    verdict = ("C beats A and B" if beats else "C does not beat both A and B") + ", and " + (
        "C improves as its evaluation memory grows" if grows else
        "C does not improve monotonically with more evaluation memory")
    print(claim, verdict)
    minutes = (time.time() - start) / 60
    tokens = next(iter(table.values()))[0][0]["tokens"]
    write_section("xl", f"""
## Transformer-XL: relative positions and segment memory (Dai et al. 2019)

Regenerate: `python bench/experiments/xl.py --steps {a.steps}` ({minutes:.0f} min;
{machine()}). Tiny GPT (4 layers, hidden 128, 4 heads, 8k BPE on the standard library's
docstrings), segments of {SEG} tokens, 16 lanes (`data.ordering=consecutive`), {a.steps}
steps, lr 1e-3 cosine, dropout 0.1, TP=1. Validation perplexity by the XL protocol:
the whole validation stream ({tokens} targets, 8 lanes) in consecutive segments of
{SEG}, every token predicted once, the memory carried from segment to segment.

{chr(10).join(rows)}

{claim} Measured: {verdict} (the paper's expectation: both). Best C: {best_c:.1f}.
`python bench/xl_speed.py` measures the evaluation speed claim (XL against a vanilla
sliding window over the same 512 positions), see the README.

![training loss and evaluation memory](img/xl.png)
""", toc={"paper": "xl", "claim": "segment memory with relative positions beats a fixed "
                               "context, and more memory at evaluation helps",
          "measured": f"C {c_[64]:.0f} vs A {a_[0]:.0f} and B {b_[0]:.0f} perplexity; by "
                      f"evaluation memory 0/64/256: {c_[0]:.0f}/{c_[64]:.0f}/{c_[256]:.0f}",
          "verdict": "agrees" if beats and grows else "partly" if beats else "disagrees"})


def _plot(curves: dict, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for name, points in curves.items():
        left.plot(*zip(*points, strict=True), label=name, lw=1.2)
    left.set_xlabel("step")
    left.set_ylabel("training loss (nats / token)")
    left.grid(alpha=0.3)
    left.legend()
    for name, (res, _) in table.items():
        mems = sorted(res)
        right.plot(mems, [res[m]["perplexity"] for m in mems], "o-", label=name)
    right.set_xlabel("memory at evaluation (tokens)")
    right.set_ylabel("validation perplexity")
    right.grid(alpha=0.3)
    right.legend()
    fig.suptitle("Transformer-XL, tiny GPT on CPU")
    fig.tight_layout()
    save_figure(fig, "xl.png")


if __name__ == "__main__":
    main()
