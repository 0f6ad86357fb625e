"""PAR's search over sublayer types with a Gumbel-softmax supernet (Mandava et al. 2020).

    python -m megatron_lite.search configs/gpt2/tiny-cpu.yaml search.blocks=12 [key=value]
    torchrun --nproc_per_node 2 -m megatron_lite.search CONFIG ...      # TP / DP

A supernet of ``search.blocks`` mixed blocks (``megatron_lite/experiments/supernet.py``) is
trained on the config's data: its weights by the config's ``optim.*`` (AdamW, the usual
schedule; the paper used lr 1e-2 and weight decay 1e-4, set them to reproduce it), its
architecture parameters alpha by their own group (``search.arch_lr`` 1e-2,
``search.arch_weight_decay`` 5e-4, the paper's), frozen for ``search.freeze_steps``.
The temperature anneals from ``search.tau_start`` to ``search.tau_end`` (exponentially,
over the steps after the freeze).

Convergence: after the freeze, at every step, each block's argmax branch is compared with
the previous step's; the search stops when at least ``ceil(search.fraction x blocks)``
blocks have kept their argmax for the last ``search.window`` steps (or at
``train.max_steps``).

Writes into ``train.run_dir``: ``search.json`` (alpha and the branch probabilities per
logged step, the final pattern), ``found.yaml`` (a config that trains the found
architecture with ``python -m megatron_lite.train``: identity blocks removed, the
pattern written out), ``search.png`` (every block's branch probabilities over the steps),
``metrics.jsonl`` and checkpoints (a search resumes exactly, alpha and its optimizer
state included).

The search is the training loop (:class:`~megatron_lite.training.trainer.Trainer`) with
the supernet as its model and a :class:`SearchHook`: signals, ``train.exit_after``,
``train.save_interval`` and the validation at ``train.eval_interval`` (of the expected
supernet, softmax(alpha), no noise) work as in ``megatron_lite.train``; the outputs above
are written when the search converges or reaches ``train.max_steps``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
from pathlib import Path

import torch.nn.functional as F

from megatron_lite.cli import config_command, config_keys_help
from megatron_lite.config import Config, ConfigError, save_config
from megatron_lite.dryrun import dry_run
from megatron_lite.experiments.supernet import SuperTransformer
from megatron_lite.files import atomic_path, atomic_write
from megatron_lite.hooks import TrainingHook
from megatron_lite.models.gpt import GPTModel
from megatron_lite.parallel import ParallelContext
from megatron_lite.training.trainer import Trainer


def check_search(cfg: Config) -> None:
    """One error naming every unusable ``search.*`` setting."""
    s, problems = cfg.search, []
    if cfg.model.arch != "gpt":
        problems.append("the PAR search is for GPT (model.arch=gpt)")
    if s.blocks < 0 or (s.blocks == 0 and cfg.model.num_layers <= 0):
        problems.append(f"search.blocks={s.blocks} must be > 0 (0: 2 x model.num_layers)")
    if not s.branches or set(s.branches) - set("sfi") or len(set(s.branches)) != len(s.branches):
        problems.append(f"search.branches={s.branches!r}: give each of s, f, i at most once, "
                        "at least one")
    if not 0 < s.tau_end <= s.tau_start:
        problems.append(f"search.tau_end={s.tau_end} must be in (0, search.tau_start="
                        f"{s.tau_start}]")
    if not 0 < s.fraction <= 1 or s.window < 1:
        problems.append("search.fraction must be in (0, 1] and search.window >= 1")
    # refused, not extended: train.max_steps also sets the run's LR schedule and the
    # temperature's, so a quietly longer run would not be the run asked for
    if cfg.train.max_steps <= s.freeze_steps:
        problems.append(f"train.max_steps={cfg.train.max_steps} <= search.freeze_steps="
                        f"{s.freeze_steps}: alpha would never train (the architecture found "
                        "would be the uniform start's); raise train.max_steps above it or "
                        "lower search.freeze_steps")
    if cfg.parallel.engine != "ddp":
        problems.append("the search runs on the ddp engine (parallel.engine=ddp)")
    if cfg.train.params_dtype != "fp32":
        problems.append("the search trains fp32 weights (train.params_dtype=fp32; "
                        "train.precision=bf16 autocasts)")
    if cfg.model.mem_len > 0 or cfg.model.adaptive_span:
        problems.append("the search has no Transformer-XL memory (model.mem_len=0, no "
                        "adaptive span): search with relative positions, then train the "
                        "found pattern with a memory")
    if cfg.model.activation_checkpointing == "full":
        problems.append("the supernet has no full activation checkpointing (use selective)")
    if cfg.train.compile:
        problems.append("the supernet is not compiled (train.compile=false)")
    if cfg.train.sample_interval:
        problems.append("the supernet has no KV cache to sample with (train.sample_interval=0;"
                        " sample the run of found.yaml)")
    if problems:
        raise ConfigError("; ".join(problems))


def build_supernet(blocks: int, branches: str):
    """A ``make_model`` for :func:`build_run`: a GPT whose stack is the supernet."""
    def make(model_cfg, ctx: ParallelContext, device=None) -> GPTModel:
        shell = dataclasses.replace(model_cfg, num_layers=0, sublayer_pattern="",
                                    sandwich_coefficient=0, par_ratio=0.0)
        model = GPTModel(shell, ctx, device)  # embeddings; no sublayers
        model.transformer = SuperTransformer(model_cfg, ctx, blocks, branches, device)
        model.cfg = model_cfg
        return model

    return make


def temperature(step: int, cfg: Config) -> float:
    s, total = cfg.search, cfg.train.max_steps
    frac = min(1.0, max(0, step - s.freeze_steps) / max(1, total - s.freeze_steps))
    return s.tau_start * (s.tau_end / s.tau_start) ** frac


def found_config(cfg: Config, pattern: str) -> Config:
    """The config that trains ``pattern`` as an ordinary model."""
    model = dataclasses.replace(cfg.model, num_layers=max(1, math.ceil(len(pattern) / 2)),
                                sublayer_pattern=pattern, sandwich_coefficient=0,
                                par_ratio=0.0, layers_to_keep="")
    train = dataclasses.replace(cfg.train, run_dir=cfg.train.run_dir + "-found", load=None,
                                exit_after=0)
    return dataclasses.replace(cfg, model=model, train=train,
                               search=type(cfg.search)())


class SearchHook(TrainingHook):
    """The PAR search in the training loop (the supernet is the model: see
    :func:`search_trainer`).

    Adds alpha's optimizer group (its own lr and weight decay, outside the schedule and
    the gradient clipping); sets the temperature and, per micro-batch, the Gumbel noise's
    key; drops alpha's gradient while frozen (AdamW then leaves it bitwise unchanged);
    follows each block's argmax for convergence and stops the run there; keeps the
    history of alpha (in the checkpoints: a search resumes exactly) and writes
    ``search.json``, ``found.yaml`` and ``search.png`` when the search is done.
    """

    def __init__(self, cfg: Config):
        check_search(cfg)
        self.cfg, self.blocks = cfg, cfg.search.blocks or 2 * cfg.model.num_layers
        self.history: list[dict] = []
        self.changed = [0] * self.blocks  # the step each block's argmax last changed
        self.argmax: list[int] | None = None  # each block's argmax after the last step

    def describe(self, trainer: Trainer) -> str:
        s = self.cfg.search
        return (f"PAR search (Mandava et al. 2020): {self.blocks} mixed blocks of "
                f"{', '.join(s.branches)}; alpha frozen for search.freeze_steps="
                f"{s.freeze_steps} steps, then trained for up to "
                f"{self.cfg.train.max_steps - s.freeze_steps} (train.max_steps="
                f"{self.cfg.train.max_steps}), tau {s.tau_start:g} -> {s.tau_end:g}")

    def param_groups(self, trainer: Trainer) -> list[dict]:
        s = self.cfg.search
        self.net = trainer.model.transformer
        self.net.seed, self.net.hard = self.cfg.train.seed, s.hard
        return [{"params": [self.net.alpha], "lr": s.arch_lr,
                 "weight_decay": s.arch_weight_decay, "lr_schedule": False, "clip": False}]

    def meta_state(self) -> dict:
        return {"search_history": self.history, "search_changed": self.changed}

    def load_meta_state(self, meta: dict) -> None:
        if "search_history" in meta:
            self.history, self.changed = meta["search_history"], meta["search_changed"]
            self.argmax = None

    def converged(self, step: int) -> bool:
        s = self.cfg.search
        if step < s.freeze_steps + s.window:
            return False
        stable = sum(step - c >= s.window for c in self.changed)
        return stable >= math.ceil(s.fraction * self.blocks)

    def should_stop(self, trainer: Trainer) -> bool:
        return self.converged(trainer.step)

    def before_step(self, trainer: Trainer) -> None:
        if not self.history:
            self.record(trainer.step)  # where the search starts
        if self.argmax is None:
            self.argmax = self.net.alpha.detach().argmax(-1).tolist()
        self.net.tau = temperature(trainer.step, self.cfg)

    def micro_batch(self, trainer: Trainer, batch: dict, k: int) -> dict:
        self.net.key = (trainer.step, k)
        return batch

    def before_optimizer_step(self, trainer: Trainer) -> None:
        if trainer.step < self.cfg.search.freeze_steps:
            self.net.alpha.grad = None  # AdamW skips it: alpha stays bitwise unchanged

    def step_metrics(self, trainer: Trainer) -> dict:
        step = trainer.step
        argmax = self.net.alpha.detach().argmax(-1).tolist()
        self.changed = [step if a != b else c
                        for a, b, c in zip(argmax, self.argmax, self.changed, strict=True)]
        self.argmax = argmax
        t = self.cfg.train
        if step % max(t.log_interval, 1) == 0 or step >= t.max_steps or self.converged(step):
            self.record(step)
        return {"tau": self.net.tau}

    def record(self, step: int) -> dict:
        probs = F.softmax(self.net.alpha.detach().float(), dim=-1)
        entry = {"step": step, "tau": self.net.tau,
                 "alpha": [[round(x, 5) for x in row] for row in self.net.alpha.tolist()],
                 "probs": [[round(x, 5) for x in row] for row in probs.tolist()],
                 "pattern": self.net.pattern()}
        self.history.append(entry)
        return entry

    def at_end(self, trainer: Trainer) -> None:
        step = trainer.step
        if trainer.ctx.is_main and (step >= self.cfg.train.max_steps or self.converged(step)):
            self.write_outputs(self.net.pattern(), step)  # not on a stop to resume later

    def write_outputs(self, pattern: str, step: int) -> None:
        s, run_dir = self.cfg.search, Path(self.cfg.train.run_dir)
        converged = self.converged(step)
        unfrozen = max(0, step - s.freeze_steps)  # steps that trained alpha
        summary = {"pattern": pattern, "blocks": self.blocks, "branches": s.branches,
                   "steps": step, "unfrozen_steps": unfrozen,
                   "freeze_steps": s.freeze_steps, "converged": converged,
                   "attention_blocks": pattern.count("s"),
                   "layers_per_attention": (len(pattern) / pattern.count("s")
                                            if "s" in pattern else None),
                   "history": self.history}
        with atomic_write(run_dir / "search.json") as f:
            json.dump(summary, f, indent=1)
        how = "converged" if converged else "at train.max_steps, not converged"
        if pattern:
            save_config(found_config(self.cfg, pattern), run_dir / "found.yaml",
                        comment=f"found by the PAR search in {run_dir}: {step} steps, "
                                f"{unfrozen} of them with alpha trained (after "
                                f"search.freeze_steps={s.freeze_steps}); {how}")
        plot_search(self.history, s.branches, run_dir / "search.png")
        ratio = summary["layers_per_attention"]
        par = f", PAR ratio p = {ratio:.1f}" if ratio else ""
        print(f"found {pattern!r} after {step} steps, {unfrozen} with alpha trained "
              f"({how}): {pattern.count('s')} "
              f"attention of {len(pattern)} sublayers{par}; {run_dir / 'found.yaml'}",
              flush=True)


def search_trainer(cfg: Config, ctx: ParallelContext) -> Trainer:
    """The Trainer of a search: the supernet as the model, with a :class:`SearchHook`
    (``trainer.hooks[-1]``; the supernet is ``trainer.model.transformer``)."""
    hook = SearchHook(cfg)
    return Trainer(cfg, ctx, hooks=[hook], build=build_supernet(hook.blocks, cfg.search.branches))


def plot_search(history: list[dict], branches: str, out: Path) -> None:
    """Each block's branch probabilities over the steps (the seed's GIF, as a still)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = len(history[0]["probs"])
    cols = min(blocks, 6)
    rows = -(-blocks // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), dpi=100,
                             sharex=True, sharey=True, squeeze=False)
    steps = [h["step"] for h in history]
    names = {"s": "attention", "f": "feed-forward", "i": "identity"}
    for b in range(rows * cols):
        ax = axes[b // cols][b % cols]
        if b >= blocks:
            ax.axis("off")
            continue
        for k, branch in enumerate(branches):
            ax.plot(steps, [h["probs"][b][k] for h in history], label=names[branch])
        ax.set_title(f"block {b}", fontsize=8)
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("branch probabilities softmax(alpha) over steps")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    def body(cfg, ctx) -> int:
        trainer = search_trainer(cfg, ctx)
        trainer.fit()
        return 128 + signal.Signals[trainer.interrupted] if trainer.interrupted else 0

    def dry(cfg, ctx) -> int:
        check_search(cfg)
        blocks = cfg.search.blocks or 2 * cfg.model.num_layers
        return dry_run(cfg, ctx, [f"search: {blocks} mixed blocks of {cfg.search.branches}, "
                                  f"alpha frozen for {cfg.search.freeze_steps} steps (the "
                                  "planner counts the ordinary model, not the supernet)"])

    return config_command("python -m megatron_lite.search", __doc__, body, argv,
                          config_help="a GPT config; search.* keys set the search",
                          overrides_help="section.key=value (anywhere on the line)",
                          epilog=config_keys_help(first="search"), dry_run=dry)


if __name__ == "__main__":
    sys.exit(main())
