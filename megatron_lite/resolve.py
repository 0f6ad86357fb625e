"""Resolve once: the loaded config plus the job's layout -> the config a run uses.

    tokenizer, notes = resolve_config(cfg, ctx)   # in place; then nothing changes cfg

Every command builds through :func:`megatron_lite.run.build_run`, which resolves first;
what a run saves as ``config.yaml`` is what it ran with. Resolving:

1. makes every path key absolute (``config.yaml`` works from any directory later);
2. turns ``train.global_batch_tokens`` into samples, a multiple of micro-batch x DP;
3. takes ``model.vocab_size`` from the tokenizer named in ``data.*``;
4. checks everything at once (:func:`check_config`: the sections, the model's parts,
   the TP x DP layout over the world size): one error naming every problem; and that
   the model's state fits the device before anything is allocated (:func:`check_fits`);
5. writes out what a key implied: the sublayer pattern of a sandwich or PAR key, and
   what each model part derives from its keys (:meth:`Part.resolve`: the memory an
   adaptive span needs).

``train.micro_batch_size=auto`` is the one value decided later: it needs the built model
and optimizer, so the Trainer probes it (:mod:`megatron_lite.training.probe`) before it
saves ``config.yaml`` or trains a step; until then it reads 1.
"""

from __future__ import annotations

import os

import torch

from megatron_lite.config import Config, ConfigError, resolve_paths
from megatron_lite.data.tokenizer import CONFIG_KEYS, Tokenizer, build_tokenizer
from megatron_lite.devices import host_memory
from megatron_lite.memory import estimate_parameters
from megatron_lite.models import model_problems
from megatron_lite.models.registry import resolve_parts
from megatron_lite.parallel import ParallelConfigError, ParallelContext, validate_parallel_config
from megatron_lite.parallel.pipeline import largest_stage_share, pipeline_problems


def names_tokenizer(cfg: Config) -> bool:
    """Whether ``data.*`` names a tokenizer (a type and its files)."""
    d = cfg.data
    return bool(d.tokenizer_type and (d.vocab_file or d.tokenizer_model))


def tokenizer_from_config(cfg: Config) -> Tokenizer | None:
    """The tokenizer named in ``data.*``, or None when the config names none."""
    d = cfg.data
    if not names_tokenizer(cfg):
        return None
    return build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model,
                           names=CONFIG_KEYS)


def check_config(cfg: Config, world_size: int = 1) -> None:
    """The config's own checks, its model parts' and the TP x DP x PP layout over
    ``world_size``: one :class:`ConfigError` naming every problem."""
    problems = cfg.problems() + model_problems(cfg)
    m, t = cfg.model, cfg.train
    try:
        validate_parallel_config(
            world_size, cfg.parallel.tensor_parallel_size, hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads, ffn_hidden_size=m.ffn_hidden_size,
            global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size or 1,
            pipeline_parallel_size=cfg.parallel.pipeline_parallel_size)
    except ParallelConfigError as err:
        problems.append(str(err))
    tp, groups = cfg.parallel.tensor_parallel_size, m.query_groups
    if tp >= 1 and groups % tp and tp % groups:
        problems.append(f"model.num_query_groups={groups} and parallel.tensor_parallel_size="
                        f"{tp}: the K/V heads split over TP when one divides the other only")
    problems += pipeline_problems(cfg, world_size)
    if problems:
        raise ConfigError("; ".join(problems))


def resolve_global_batch(cfg: Config, dp: int) -> str | None:
    """``train.global_batch_tokens`` -> ``global_batch_size`` samples (in place); returns
    the line that says so, or None when it is not set."""
    t, m = cfg.train, cfg.model
    if not t.global_batch_tokens:
        return None
    tokens = t.global_batch_tokens
    size_from = cfg.explicit.get("train.global_batch_size")
    tokens_from = cfg.explicit.get("train.global_batch_tokens", "")
    # a command-line global_batch_tokens replaces a config file's global_batch_size (the
    # later, more specific source wins); both from the same kind of source is ambiguous
    if size_from and (size_from.startswith("override") or not tokens_from.startswith("override")):
        raise ConfigError(f"{size_from}: train.global_batch_size "
                          "and train.global_batch_tokens both set: give one")
    unit = (t.micro_batch_size or 1) * dp
    samples = max(round(tokens / m.seq_length / unit), 1) * unit
    t.global_batch_size, t.global_batch_tokens = samples, 0  # config.yaml: samples only
    return (f"train.global_batch_tokens={tokens}: global_batch_size={samples} "
            f"samples = {samples * m.seq_length} tokens of {m.seq_length}")


def check_fits(cfg: Config, ctx: ParallelContext, bytes_per_param: float) -> None:
    """Refuse, before anything is allocated, a model whose state cannot fit this rank's
    device (its memory; a CPU's host memory shared by the ranks on it): one line with
    the estimate (:func:`megatron_lite.memory.estimate_parameters`). A pipelined run
    counts its largest stage (:func:`~megatron_lite.parallel.pipeline.largest_stage_share`
    of the layers, as the planner does, plus the embeddings)."""
    tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    params = estimate_parameters(cfg.model, tp)
    stage = estimate_parameters(cfg.model, tp, largest_stage_share(cfg)) if pp > 1 else params
    need = stage / tp * bytes_per_param
    if ctx.device.type == "cuda":
        have, where = torch.cuda.get_device_properties(ctx.device).total_memory, "GPU"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        have, where = host_memory() / max(local, 1), f"host memory / {local} local ranks"
    if need > have:
        raise ConfigError(
            f"the model has about {params / 1e9:.3g}B parameters: {need / 2**30:.1f} GiB of "
            f"state per rank at TP={tp}"
            f"{f' x PP={pp} (its largest stage)' if pp > 1 else ''} ({bytes_per_param:g} "
            f"B/param), more than this rank's {have / 2**30:.1f} GiB ({where}); "
            "python -m megatron_lite.plan CONFIG --tp N --pp P says what fits")


def state_bytes_per_param(cfg: Config, dp: int) -> float:
    """What training holds per parameter on a rank before any activation (the planner's
    states): DDP fp32 weights, gradients and Adam 16 B (``params_dtype=bf16``: 18);
    ZeRO its weights and gradients (partitioned at stage 2) and 12 B of masters and
    moments split over DP; the distributed optimizer Megatron's 6 + 12/DP (bf16 weights)
    or 8 + 8/DP (fp32 weights, the masters themselves)."""
    t, par = cfg.train, cfg.parallel
    if par.engine == "deepspeed":
        w = 2 if t.precision != "fp32" else 4
        return w + (w if par.zero_stage == 1 else w / dp) + 12 / dp
    if par.distributed_optimizer:
        return 6 + 12 / dp if t.params_dtype == "bf16" else 8 + 8 / dp
    return 18 if t.params_dtype == "bf16" else 16


def resolve_config(cfg: Config, ctx: ParallelContext,
                   training: bool = False) -> tuple[Tokenizer | None, list[str]]:
    """Resolve ``cfg`` for ``ctx``'s layout, in place (see the module docstring): returns
    the tokenizer it names (or None) and the lines worth telling the user. A config
    resolved before is only checked against the layout again. ``training``: the fit
    check counts gradients and the optimizer state too (else the fp32 weights)."""
    if cfg.resolved:  # the same tokenizer; nothing changes
        check_config(cfg, ctx.world_size)
        _check_job(cfg, ctx)
        return tokenizer_from_config(cfg), []
    resolve_paths(cfg)
    notes = [resolve_global_batch(cfg, ctx.dp_size)]
    tokenizer = tokenizer_from_config(cfg)
    if tokenizer is not None:
        where = cfg.explicit.get("model.vocab_size")
        if where and cfg.model.vocab_size != tokenizer.vocab_size:
            raise ConfigError(
                f"{where}: model.vocab_size={cfg.model.vocab_size} but the tokenizer "
                f"({cfg.data.vocab_file or cfg.data.tokenizer_model}) has "
                f"{tokenizer.vocab_size} tokens: leave model.vocab_size out (it is the "
                "tokenizer's) or use the tokenizer it was meant for")
        cfg.model.vocab_size = tokenizer.vocab_size
    check_config(cfg, ctx.world_size)
    check_fits(cfg, ctx, state_bytes_per_param(cfg, ctx.dp_size) if training else 4)
    m = cfg.model
    if (m.sandwich_coefficient or m.par_ratio) and not m.sublayer_pattern:
        m.sublayer_pattern = m.pattern  # written into config.yaml: later commands rebuild it
    resolve_parts(m)  # e.g. the memory an adaptive span needs
    _check_job(cfg, ctx)
    cfg.resolved = True
    return tokenizer, [n for n in notes if n]


def _check_job(cfg: Config, ctx: ParallelContext) -> None:
    if cfg.parallel.tensor_parallel_size != ctx.tp_size:
        raise ConfigError(f"parallel.tensor_parallel_size={cfg.parallel.tensor_parallel_size}"
                          f" but the job was started with TP={ctx.tp_size}")
    if cfg.parallel.pipeline_parallel_size != ctx.pp_size:
        raise ConfigError(f"parallel.pipeline_parallel_size={cfg.parallel.pipeline_parallel_size}"
                          f" but the job was started with PP={ctx.pp_size}")
