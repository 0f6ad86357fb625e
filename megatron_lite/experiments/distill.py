"""Distil a trained teacher into a smaller student: MiniLM and MiniLMv2.

    python -m megatron_lite.distill STUDENT.yaml distill.teacher=runs/bert-base [key=value ...]
    torchrun --nproc_per_node 2 -m megatron_lite.distill STUDENT.yaml distill.teacher=RUN \\
        distill.method=minilm parallel.tensor_parallel_size=2

``STUDENT.yaml`` is any megatron-lite model config (fewer layers, a smaller hidden size);
its ``data`` is the teacher's data, tokenized with the teacher's vocabulary. The teacher
(``distill.teacher``: a run or checkpoint at any TP size, or a Hugging Face folder) is
loaded at the student's TP size on the same TP group, frozen, in eval mode, and run
without an autograd graph; the student's last attention layer learns the relations of the
teacher's layer ``distill.teacher_layer`` (default its last; MiniLMv2 uses an upper-middle
one for large teachers): see :mod:`megatron_lite.experiments.relations`. The loss is the sum
(MiniLM) or mean (MiniLMv2) of the relations' KL divergences (``kl``), plus
``distill.lm_weight`` times the student's own loss (``lm_loss``; the weight defaults to
0.5 for a GPT student, whose LM head would otherwise never train, and 0 for BERT, MiniLM's
relations only); every parameter of the student stays in the graph (its
other layers at weight zero), so DDP needs nothing special.

``distill.assistant=CONFIG`` (MiniLM section 3.3) first distils the teacher into that
assistant (the student's config with what CONFIG sets, e.g. its sizes; into
``RUN_DIR/assistant``), then the assistant into the student (``RUN_DIR``).
The output is an ordinary run directory: ``evaluate``, ``convert --to-hf`` and further
training work on the student unchanged. ``metrics.jsonl`` logs ``kl``, ``lm_loss`` and
each relation's KL.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import signal
import sys
from pathlib import Path

import torch

from megatron_lite.checkpoint import load_checkpoint, read_meta, resolve_checkpoint
from megatron_lite.cli import config_command, config_keys_help
from megatron_lite.config import Config, ConfigError, load_config
from megatron_lite.dryrun import dry_run
from megatron_lite.experiments.relations import minilm_losses, minilmv2_losses
from megatron_lite.hooks import TrainingHook
from megatron_lite.models import build_model
from megatron_lite.models.attention import SelfAttention, captured
from megatron_lite.models.hf import from_hf, load_hf_model
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.training.trainer import Trainer


def attention_layers(model) -> list[SelfAttention]:
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def load_teacher(path: str, ctx: ParallelContext):
    """The teacher at ``ctx``'s TP size: frozen, eval mode."""
    p = Path(path)
    if (p / "config.json").is_file():  # a Hugging Face folder
        teacher = from_hf(load_hf_model(p), ctx, hidden_dropout=0.0,
                          attention_dropout=0.0).to(ctx.device)
    else:
        ckpt = resolve_checkpoint(p)
        cfg = load_config(ckpt / "config.yaml")
        m = dataclasses.replace(cfg.model, hidden_dropout=0.0, attention_dropout=0.0,
                                activation_checkpointing="none", layerdrop=0.0,
                                layers_to_keep="")  # every layer runs: teacher_layer counts them
        teacher = build_model(m, ctx, device=ctx.device)
        load_checkpoint(ckpt, teacher, ctx)
    teacher.eval().requires_grad_(False)
    return teacher


def check_pair(cfg: Config, teacher, tp: int) -> None:
    """One error naming every way this teacher and student cannot be distilled."""
    s, t, d = cfg.model, teacher.cfg, cfg.distill
    problems = []
    if s.arch != t.arch:
        problems.append(f"the teacher is model.arch={t.arch}, the student {s.arch}")
    if s.vocab_size != t.vocab_size:
        problems.append(f"the teacher's vocabulary has {t.vocab_size} tokens, the student's "
                        f"data {s.vocab_size}: distil on data tokenized with the teacher's")
    if s.position_embedding != "learned" or t.position_embedding != "learned":
        problems.append("relative positions (Transformer-XL) are not distilled")
    if s.layerdrop > 0 or s.layers_to_keep:
        problems.append("the student's model.layerdrop / model.layers_to_keep would skip the "
                        "layer whose relations are distilled")
    if s.activation_checkpointing == "full":
        problems.append("the student's model.activation_checkpointing=full recomputes the "
                        "layer whose q, k, v the loss needs: use none or selective")
    layers = len(attention_layers(teacher))
    if not -layers <= d.teacher_layer < layers:
        problems.append(f"distill.teacher_layer={d.teacher_layer}: the teacher has {layers} "
                        "attention layers")
    if d.method == "minilm" and s.num_attention_heads != t.num_attention_heads:
        problems.append(f"distill.method=minilm distils attention per head: the teacher has "
                        f"{t.num_attention_heads} heads, the student {s.num_attention_heads} "
                        "(use distill.method=minilmv2, whose relation heads are free)")
    if d.method == "minilmv2":
        r = d.relation_heads or s.num_attention_heads
        for who, h in (("student", s.hidden_size), ("teacher", t.hidden_size)):
            if h % r:
                problems.append(f"distill.relation_heads={r} does not divide the {who}'s "
                                f"hidden size {h}")
        if r % tp:
            problems.append(f"distill.relation_heads={r} is not a multiple of the TP size "
                            f"{tp}: each TP rank must hold whole relation heads")
    if problems:
        raise ConfigError("; ".join(problems))


def default_lm_weight(arch: str) -> float:
    """``distill.lm_weight`` when it is not set: a GPT student learns its own LM loss at
    weight 0.5 beside the relations (without it its output head never trains: a student
    that cannot predict a token), a BERT student the relations alone (MiniLM).
    ``python bench/distill_lm_weight.py`` (150 steps, 2L h64 student of a 4L h128 teacher,
    8k vocabulary): validation perplexity 8633 at weight 0, 856 at 0.5, 873 at 1, 880 at
    2, 924 for the student trained on its LM loss alone."""
    return 0.5 if arch == "gpt" else 0.0


class DistillHook(TrainingHook):
    """Distillation in the training loop: each micro-batch's loss is the relations' KL
    between the frozen teacher and the student's last attention layer (plus
    ``distill.lm_weight`` x the student's own loss); the step's record adds each
    relation's KL and the student's own loss.

    Built before the Trainer: the teacher is loaded (and its RNG draws made) before the
    student is drawn and a checkpoint's RNG states restored, so resuming stays exact.
    """

    def __init__(self, cfg: Config, ctx: ParallelContext):
        if not cfg.distill.teacher:
            raise ConfigError("distill.teacher is not set (a run, a checkpoint or a Hugging "
                              "Face folder)")
        if cfg.train.params_dtype != "fp32":
            raise ConfigError("train.params_dtype=bf16 is not offered for distillation (the "
                              "relations compare an fp32 teacher): use train.precision=bf16")
        if cfg.train.micro_batch_size == 0:
            raise ConfigError("train.micro_batch_size=auto is not offered for distillation "
                              "(the probe does not run the teacher): give a size")
        if cfg.distill.lm_weight is None:  # resolved here: config.yaml records the value
            cfg.distill.lm_weight = default_lm_weight(cfg.model.arch)
        if cfg.distill.lm_weight < 0:
            raise ConfigError(f"distill.lm_weight={cfg.distill.lm_weight} must be >= 0")
        self.teacher = load_teacher(cfg.distill.teacher, ctx)
        self.kl_sums: dict[str, torch.Tensor] = {}

    def describe(self, trainer: Trainer) -> str:
        d = trainer.cfg.distill
        how = {"minilm": "MiniLM (attention + value relations)",
               "minilmv2": f"MiniLMv2 (Q-Q, K-K, V-V relations, {self.relation_heads} heads)"}
        return (f"distillation from {d.teacher}: {how[d.method]} of its attention layer "
                f"{d.teacher_layer} into the student's last; loss = kl + {d.lm_weight:g} x "
                "lm_loss (distill.lm_weight)")

    def setup(self, trainer: Trainer) -> None:
        cfg, d = trainer.cfg, trainer.cfg.distill
        check_pair(cfg, self.teacher, trainer.ctx.tp_size)
        self.teacher_layer = attention_layers(self.teacher)[d.teacher_layer]
        self.student_layer = attention_layers(trainer.model)[-1]
        self.relation_heads = d.relation_heads or cfg.model.num_attention_heads

    def loss(self, trainer: Trainer, batch: dict) -> torch.Tensor:
        cfg, ctx = trainer.cfg, trainer.ctx
        d = cfg.distill
        inputs = {k: v for k, v in batch.items() if "labels" not in k}
        with captured([self.teacher_layer, self.student_layer]) as (seen_t, seen_s):
            with torch.no_grad():
                self.teacher(**inputs)
            own = trainer.engine(**batch)
        teacher, student = seen_t[0], seen_s[-1]
        mask = batch.get("attention_mask")
        if d.method == "minilm":
            parts = minilm_losses(teacher, student, cfg.model.num_attention_heads,
                                  ctx.tp_group, mask)
            loss = sum(parts.values())
        else:
            parts = minilmv2_losses(teacher, student, self.relation_heads, ctx.tp_size,
                                    ctx.tp_group, mask)
            loss = sum(parts.values()) / len(parts)
        for name, value in parts.items():
            self.kl_sums[name] = self.kl_sums.get(name, 0.0) + value.detach()
        self.kl_sums["kl"] = self.kl_sums.get("kl", 0.0) + loss.detach()
        self.kl_sums["own"] = self.kl_sums.get("own", 0.0) + own.detach()
        return loss + d.lm_weight * own  # weight 0 keeps every parameter in the graph

    def step_metrics(self, trainer: Trainer) -> dict:
        """The distillation term ``kl`` (the relations' KLs combined as in the loss; the
        record's ``loss`` is ``kl + distill.lm_weight x lm_loss``), each relation's KL
        (``kl_attention``, ``kl_value`` or ``kl_query``, ``kl_key``, ``kl_value``) and the
        student's own LM/MLM loss (``lm_loss``), means over the step."""
        out = {}
        if self.kl_sums:
            names = list(self.kl_sums)
            values = all_reduce(torch.stack([torch.as_tensor(self.kl_sums[n]).float()
                                             for n in names]), trainer.ctx.dp_group)
            n = trainer.accum * trainer.ctx.dp_size
            for name, value in zip(names, values.tolist(), strict=True):
                key = {"own": "lm_loss", "kl": "kl"}.get(name, f"kl_{name}")
                out[key] = value / n
            self.kl_sums = {}
        return out


def distiller(cfg: Config, ctx: ParallelContext) -> Trainer:
    """The Trainer of a distillation run: the student's, with a :class:`DistillHook`."""
    return Trainer(cfg, ctx, hooks=[DistillHook(cfg, ctx)])


def assistant_config(cfg: Config) -> Config:
    """The student's config with what ``distill.assistant``'s file sets (its sizes, say)."""
    helper = copy.deepcopy(cfg)
    extra = load_config(cfg.distill.assistant)
    for dotted in extra.explicit:
        section, key = dotted.split(".")
        setattr(getattr(helper, section), key, getattr(getattr(extra, section), key))
    return helper


def finished(cfg: Config) -> bool:
    """Whether ``train.run_dir`` already holds a checkpoint at ``train.max_steps``."""
    latest = Path(cfg.train.run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return False
    return read_meta(resolve_checkpoint(cfg.train.run_dir))["step"] >= cfg.train.max_steps


def distil(cfg: Config, ctx: ParallelContext) -> Trainer:
    trainer = distiller(cfg, ctx)
    trainer.fit()
    return trainer


def main(argv: list[str] | None = None) -> int:
    def body(cfg, ctx) -> int:
        stages = [cfg]
        if cfg.distill.assistant:  # teacher -> assistant -> student
            helper = assistant_config(cfg)
            helper.distill = dataclasses.replace(cfg.distill, assistant="")
            helper.train.run_dir = str(Path(cfg.train.run_dir) / "assistant")
            cfg.distill = dataclasses.replace(cfg.distill, assistant="",
                                              teacher=helper.train.run_dir, teacher_layer=-1)
            stages = [helper, cfg]
        for stage in stages:
            if stage is not cfg and finished(stage):  # a rerun: the assistant is done
                continue
            d = distil(stage, ctx)
            interrupted, run_dir, step = d.interrupted, d.run_dir, d.step
            del d  # the teacher, the model, its optimizer: free before the next stage
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if interrupted:
                return 128 + signal.Signals[interrupted]
            if ctx.is_main:
                print(f"done: {run_dir} at step {step} (student of "
                      f"{stage.distill.teacher})", flush=True)
        return 0

    def dry(cfg, ctx) -> int:
        d = cfg.distill
        if not d.teacher:
            raise ConfigError("distill.teacher is not set (a run, a checkpoint or a Hugging "
                              "Face folder)")
        if not (Path(d.teacher) / "config.json").is_file():
            resolve_checkpoint(d.teacher)  # a teacher that is not there: its one error
        weight = d.lm_weight if d.lm_weight is not None else default_lm_weight(cfg.model.arch)
        via = f"; through the assistant {d.assistant}" if d.assistant else ""
        return dry_run(cfg, ctx, [f"distill: teacher {d.teacher}, distill.method={d.method}, "
                                  f"loss = kl + {weight:g} x lm_loss{via}"])

    return config_command("python -m megatron_lite.distill", __doc__, body, argv,
                          config_help="the student's config (any megatron-lite model config)",
                          overrides_help="section.key=value (distill.teacher=...)",
                          epilog=config_keys_help(first="distill"), dry_run=dry)


if __name__ == "__main__":
    sys.exit(main())
