"""PAR's search over sublayer types with a Gumbel-softmax supernet (Mandava et al. 2020).

    python -m megatron_lite.search configs/gpt2/tiny-cpu.yaml search.blocks=12 [key=value]
    torchrun --nproc_per_node 2 -m megatron_lite.search CONFIG ...      # TP / DP

A supernet of ``search.blocks`` mixed blocks (``megatron_lite/models/supernet.py``) is
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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.checkpoint import load_checkpoint, save_checkpoint
from megatron_lite.cli import parse_args, run_cli
from megatron_lite.config import Config, ConfigError, load_config, resolve_paths, save_config
from megatron_lite.files import atomic_path, atomic_write
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.supernet import SuperTransformer
from megatron_lite.parallel import ParallelContext, parallel_session
from megatron_lite.run import build_run
from megatron_lite.training.metrics import MetricsLogger
from megatron_lite.training.optim import build_optimizer, clip_grads_
from megatron_lite.training.precision import autocast
from megatron_lite.training.schedule import learning_rate


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


class Search:
    """One search run; :meth:`run` returns the final pattern."""

    def __init__(self, cfg: Config, ctx: ParallelContext):
        check_search(cfg)
        s = cfg.search
        self.cfg, self.ctx = resolve_paths(cfg), ctx  # config.yaml works from anywhere
        self.blocks = s.blocks or 2 * cfg.model.num_layers
        self.run = build_run(cfg, ctx, make_model=build_supernet(self.blocks, s.branches))
        self.model, self.net = self.run.model, self.run.model.transformer
        self.net.seed, self.net.hard = cfg.train.seed, s.hard
        alpha = {"params": [self.net.alpha], "lr": s.arch_lr,
                 "weight_decay": s.arch_weight_decay, "architecture": True}
        self.optimizer = build_optimizer(self.model, cfg.optim, ctx.device, [alpha])
        self.weights = [p for p in self.model.parameters()
                        if p.requires_grad and p is not self.net.alpha]
        self.engine = DistributedDataParallel(
            self.model, process_group=ctx.dp_group, bucket_cap_mb=cfg.parallel.ddp_bucket_mb,
        ) if ctx.dp_size > 1 else self.model
        self.run_dir = Path(cfg.train.run_dir)
        self.step = self.consumed = 0
        self.history: list[dict] = []
        self.changed = [0] * self.blocks  # the step each block's argmax last changed
        if (self.run_dir / "checkpoints" / "latest").is_file():
            meta = load_checkpoint(self.run_dir, self.model, ctx, optimizer=self.optimizer,
                                   restore_rng=True)
            self.step, self.consumed = meta["step"], meta["consumed_samples"]
            self.history, self.changed = meta["search_history"], meta["search_changed"]
            if ctx.is_main:
                print(f"resumed the search at step {self.step}", flush=True)
        self.argmax = self.net.alpha.detach().argmax(-1).tolist()
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(self.run_dir, ctx.is_main, cfg.log.tensorboard, self.step)

    def converged(self) -> bool:
        s = self.cfg.search
        if self.step < s.freeze_steps + s.window:
            return False
        stable = sum(self.step - c >= s.window for c in self.changed)
        return stable >= math.ceil(s.fraction * self.blocks)

    def train_step(self, batches) -> dict:
        cfg, t = self.cfg, self.cfg.train
        frozen = self.step < cfg.search.freeze_steps
        lr = learning_rate(self.step, cfg.optim, t.max_steps)
        for group in self.optimizer.param_groups:
            if not group.get("architecture"):
                group["lr"] = lr
        self.net.tau = temperature(self.step, cfg)
        self.engine.train()
        total = torch.zeros((), device=self.ctx.device)
        for k in range(self.run.accum):
            self.net.key = (self.step, k)
            batch = self.run.to_device(next(batches))
            sync = contextlib.nullcontext() if k == self.run.accum - 1 or \
                self.engine is self.model else self.engine.no_sync()
            with sync:
                with autocast(t.precision, self.ctx.device):
                    loss = self.engine(**batch)
                (loss / self.run.accum).backward()
            total += loss.detach().float()
        if frozen:
            self.net.alpha.grad = None  # AdamW skips it: alpha stays bitwise unchanged
        grad_norm = clip_grads_(self.weights, cfg.optim.clip_grad, self.ctx)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.consumed += t.global_batch_size
        argmax = self.net.alpha.detach().argmax(-1).tolist()
        self.changed = [self.step if a != b else c
                        for a, b, c in zip(argmax, self.argmax, self.changed, strict=True)]
        self.argmax = argmax
        return {"step": self.step, "loss": self.run.dp_mean(total / self.run.accum), "lr": lr,
                "grad_norm": grad_norm, "tau": self.net.tau, "pattern": self.net.pattern()}

    def record(self) -> dict:
        probs = F.softmax(self.net.alpha.detach().float(), dim=-1)
        entry = {"step": self.step, "tau": self.net.tau,
                 "alpha": [[round(x, 5) for x in row] for row in self.net.alpha.tolist()],
                 "probs": [[round(x, 5) for x in row] for row in probs.tolist()],
                 "pattern": self.net.pattern()}
        self.history.append(entry)
        return entry

    def save(self) -> None:
        extra = {"consumed_samples": self.consumed, "search_history": self.history,
                 "search_changed": self.changed}
        save_checkpoint(self.run_dir, self.step, self.model, self.ctx, self.cfg, extra,
                        optimizer=self.optimizer, keep=self.cfg.train.keep_checkpoints)

    def fit(self) -> str:
        t = self.cfg.train
        batches = self.run.batches(self.run.train_data, self.consumed)
        if not self.history:
            self.record()
        steps_here = 0
        while self.step < t.max_steps and not self.converged():
            if t.exit_after and steps_here >= t.exit_after:  # stop here; rerun to resume
                self.save()
                self.metrics.close()
                return self.net.pattern()
            steps_here += 1
            out = self.train_step(batches)
            if self.step % max(t.log_interval, 1) == 0:
                self.record()
                self.metrics.log({k: v for k, v in out.items() if k != "pattern"})
            if t.save_interval > 0 and self.step % t.save_interval == 0:
                self.save()
        if self.history[-1]["step"] != self.step:
            self.record()
        self.save()
        self.metrics.close()
        pattern = self.net.pattern()
        if self.ctx.is_main:
            self.write_outputs(pattern)
        return pattern

    def write_outputs(self, pattern: str) -> None:
        s = self.cfg.search
        converged = self.converged()
        summary = {"pattern": pattern, "blocks": self.blocks, "branches": s.branches,
                   "steps": self.step, "converged": converged,
                   "attention_blocks": pattern.count("s"),
                   "layers_per_attention": (len(pattern) / pattern.count("s")
                                            if "s" in pattern else None),
                   "history": self.history}
        with atomic_write(self.run_dir / "search.json") as f:
            json.dump(summary, f, indent=1)
        if pattern:
            save_config(found_config(self.cfg, pattern), self.run_dir / "found.yaml")
        plot_search(self.history, s.branches, self.run_dir / "search.png")
        ratio = summary["layers_per_attention"]
        how = "converged" if converged else "at train.max_steps"
        par = f", PAR ratio p = {ratio:.1f}" if ratio else ""
        print(f"found {pattern!r} after {self.step} steps ({how}): {pattern.count('s')} "
              f"attention of {len(pattern)} sublayers{par}; {self.run_dir / 'found.yaml'}",
              flush=True)


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
    p = argparse.ArgumentParser(prog="python -m megatron_lite.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a GPT config; search.* keys set the search")
    p.add_argument("overrides", nargs="*", help="section.key=value (anywhere on the line)")
    a = parse_args(p, argv)

    def body() -> None:
        cfg = load_config(a.config, a.overrides)
        with parallel_session(cfg.parallel.tensor_parallel_size, seed=cfg.train.seed) as ctx:
            Search(cfg, ctx).fit()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
