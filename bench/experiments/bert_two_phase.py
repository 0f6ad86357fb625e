"""BERT's two-phase sequence length (Devlin et al. 2019, appendix A.2).

    python bench/experiments/bert_two_phase.py [--steps 500] [--lengths 128 512]
                                                  # ~21 minutes on 2 CPU cores

The paper's recipe: "pre-train the model with sequence length of 128 for 90% of the steps.
Then, we train the rest 10% of the steps of sequence of 512 to learn the positional
embeddings", to save time (attention is quadratic in the length). Here: the tiny BERT
(MLM + NSP), the same steps and batch (in sequences) three ways: all at the short length,
two-phase (``train.phase2_seq_length``, from 90 % of the steps), all at the long length;
wall time of training, and validation MLM accuracy at the long length (and the short).

Most of the time is the all-512 run: this model takes 2.0 s per step at 512 on 2 cores
against 0.28 s at 128 (measured). ``--lengths 64 256`` keeps the 4x ratio in ~11 minutes.
"""

from __future__ import annotations

import time

from common import arguments, bert_data, evaluate, machine, train, write_section

BERT = "configs/bert/tiny-cpu.yaml"
ITERS = 20
NOISE = 0.01  # ~2 standard errors of an MLM accuracy over several thousand masked positions
PAPER_NOTE = " (not the paper's 128 -> 512: `--lengths 128 512` runs those)"


def main() -> None:
    a = arguments(__doc__, steps=500, lengths=(128, 512))
    S, L = a.lengths
    start = time.time()
    common = {**bert_data(), "train.max_steps": a.steps, "train.eval_interval": 0,
              "train.log_interval": 10, "model.max_position_embeddings": L}
    runs = {f"all {S}": {"model.seq_length": S},
            f"two-phase {S} -> {L}": {"model.seq_length": S, "train.phase2_seq_length": L,
                                      "train.phase2_start": 0.9},
            f"all {L}": {"model.seq_length": L}}
    results = {}
    for name, over in runs.items():
        slug = name.split()[0].replace("-", "")
        run_dir, _, seconds = train(f"bert_two_phase/{slug}", {**common, **over}, BERT)
        at = {seq: evaluate(run_dir, [f"model.seq_length={seq}"], iters=ITERS)
              for seq in (L, S)}
        results[name] = {"seconds": seconds, **{seq: r["mlm_accuracy"] for seq, r in at.items()},
                         "loss": at[L]["mlm_loss"]}
        print(f"{name:22s} {seconds:5.0f} s  MLM accuracy at {L} {at[L]['mlm_accuracy']:.3f}, "
              f"at {S} {at[S]['mlm_accuracy']:.3f}", flush=True)
    rows = [f"| schedule | training time | MLM accuracy at {L} | MLM loss at {L} | MLM accuracy "
            f"at {S} |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['seconds']:.0f} s | {r[L]:.3f} | {r['loss']:.3f} | "
                    f"{r[S]:.3f} |")
    short, two, long = (results[k] for k in runs)
    saving = long["seconds"] / two["seconds"]
    close = two[L] >= long[L] - NOISE
    fixes_long = two[L] > short[L] + NOISE
    verdict = "agrees" if close and saving > 1.5 else ("partly" if saving > 1.5 else
                                                       "disagrees")
    measured = (f"two-phase {two[L]:.3f} vs all-{L} {long[L]:.3f} MLM accuracy at {L} "
                f"in {1 / saving:.0%} of the time (all-{S}: {short[L]:.3f})")
    reading = [f"Two-phase training takes {1 / saving:.0%} of the all-{L} run's time "
               f"({two['seconds']:.0f} s vs {long['seconds']:.0f} s) and reaches MLM accuracy "
               f"{two[L]:.3f} at length {L} against {long[L]:.3f}"
               + (" (within the noise or better)." if close else
                  f" (lower by more than {NOISE}).")]
    reading.append(f"The last 10 % at {L} is what makes length {L} work: all-{S} scores "
                   f"{short[L]:.3f} at {L} ({short[S]:.3f} at {S})." if fixes_long else
                   f"All-{S} scores {short[L]:.3f} at {L}, not clearly below two-phase.")
    write_section("bert_two_phase", f"""
## Two-phase sequence length (Devlin et al. 2019, BERT)

Claim: training 90 % of the steps at length 128 and the last 10 % at 512 gives a model
that works at 512 for much less compute than training at 512 throughout. Here: {S} ->
{L}{PAPER_NOTE if (S, L) != (128, 512) else ""}, the tiny BERT (4 layers, hidden 128, MLM +
NSP, {L} positions, 8k WordPiece on the standard library's docstrings, documents of
~1,400 tokens on average), batch 16 sequences, {a.steps} steps each, lr 5e-4 linear
decay, TP=1; validation MLM accuracy (masked positions) on the same {ITERS} batches at
each length. Command: `python bench/experiments/bert_two_phase.py --steps
{a.steps} --lengths {S} {L}` ({(time.time() - start) / 60:.0f} min). Machine: {machine()}.
One seed.

{chr(10).join(rows)}

{' '.join(reading)} As in the paper, the budget is steps of a batch fixed in sequences, so
all-{L} also reads {L // S}x the tokens of all-{S}: its lead is not only the length. The
paper's motivation is the trade measured here: attention's cost grows with the square of
the length, so most of the steps are run where they are cheap.
""", toc={"paper": "bert", "claim": "90 % of steps at 128, then 512: a model for 512 at a "
                                   f"fraction of the cost (here {S} -> {L})", "measured": measured,
          "verdict": verdict})


if __name__ == "__main__":
    main()
