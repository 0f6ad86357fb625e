"""The pipeline's layout: which layers each stage holds, and what a config must satisfy
to be pipelined (the stages themselves and the schedules are
:mod:`megatron_lite.training.pipeline`).

With ``P`` stages and ``V`` virtual stages (model chunks) per stage, the model is cut into
``P x V`` chunks of consecutive layers; chunk ``c`` runs on pipeline rank ``c mod P``
(torch.distributed.pipelining's loop placement, Narayanan et al. 2021's interleaving).
The embeddings go with chunk 0, the final norm, the head and the loss with chunk
``P x V - 1``.
"""

from __future__ import annotations

from megatron_lite.config import Config

SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")


def parse_layers(text: str) -> list[int] | None:
    """``parallel.pipeline_layers`` (``"5,5,6"``) as counts, or None when unset."""
    if not text.strip():
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"parallel.pipeline_layers={text!r}: expected layer counts like "
                         "5,5,6") from None


def chunk_layers(num_layers: int, chunks: int, counts: list[int] | None = None
                 ) -> list[range]:
    """The layers of each of ``chunks`` model chunks, bottom to top: ``counts`` if given,
    else an even split (``num_layers`` divisible by ``chunks``, checked by
    :func:`pipeline_problems`)."""
    counts = counts or [num_layers // chunks] * chunks
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(s, s + n) for s, n in zip(starts, counts, strict=True)]


def largest_stage_share(cfg: Config, pp: int | None = None) -> float:
    """The share of ``model.num_layers`` on the pipeline rank holding the most layers
    (all of its chunks), at ``pp`` stages (default ``parallel.pipeline_parallel_size``):
    1 without pipelining. What the planner and the fit check scale the layers' weights
    and activations by (a layout's own problems are :func:`pipeline_problems`' to say:
    uneven counts that do not parse or add up fall back to the even split)."""
    par, layers = cfg.parallel, cfg.model.num_layers
    pp = pp or par.pipeline_parallel_size
    if pp <= 1 or layers < 1:
        return 1.0
    v = max(par.virtual_pipeline_size, 1)
    try:
        counts = parse_layers(par.pipeline_layers)
    except ValueError:
        counts = None
    if counts is None or len(counts) != pp * v or sum(counts) != layers:
        return 1 / pp
    return max(sum(counts[r::pp]) for r in range(pp)) / layers


def unpipelined(cfg: Config) -> None:
    """Set ``cfg`` (a run's, in place) to run without pipelining: what evaluate, generate
    and convert do with a checkpoint of a pipelined run (its names are global)."""
    par = cfg.parallel
    par.pipeline_parallel_size, par.virtual_pipeline_size, par.pipeline_layers = 1, 1, ""
    par.pipeline_schedule = "1f1b"


def pipeline_problems(cfg: Config, world_size: int | None = None) -> list[str]:
    """What cannot work in this config's pipeline (nothing when
    ``parallel.pipeline_parallel_size`` is 1 and the pipeline keys are unset)."""
    par, m, t = cfg.parallel, cfg.model, cfg.train
    p, v = par.pipeline_parallel_size, par.virtual_pipeline_size
    problems = []
    if p == 1:
        if par.pipeline_layers.strip() or v != 1:
            problems.append("parallel.pipeline_layers and parallel.virtual_pipeline_size "
                            "need parallel.pipeline_parallel_size > 1")
        return problems
    if p < 1 or v < 1:
        return problems  # the sizes' own messages say it
    if v > 1 and par.pipeline_schedule != "interleaved_1f1b":
        problems.append(f"parallel.virtual_pipeline_size={v} needs "
                        "parallel.pipeline_schedule=interleaved_1f1b")
    if par.pipeline_schedule == "interleaved_1f1b" and v < 2:
        problems.append("parallel.pipeline_schedule=interleaved_1f1b needs "
                        "parallel.virtual_pipeline_size >= 2 (model chunks per stage)")
    chunks = p * v
    try:
        counts = parse_layers(par.pipeline_layers)
    except ValueError as err:
        problems.append(str(err))
        counts = None
    if counts is not None:
        if len(counts) != chunks or min(counts) < 1 or sum(counts) != m.num_layers:
            problems.append(f"parallel.pipeline_layers={par.pipeline_layers} must be "
                            f"{chunks} counts >= 1 (stages x virtual stages) summing to "
                            f"model.num_layers={m.num_layers}")
    elif m.num_layers % chunks:
        problems.append(f"model.num_layers={m.num_layers} is not divisible by "
                        f"{chunks} pipeline chunks (parallel.pipeline_parallel_size={p}"
                        f"{f' x virtual_pipeline_size={v}' if v > 1 else ''}): set "
                        "parallel.pipeline_layers, e.g. 5,5,6")
    if m.arch != "gpt":
        problems.append(f"parallel.pipeline_parallel_size={p}: pipelining is for "
                        f"model.arch=gpt (not {m.arch})")
    if par.engine != "ddp":
        problems.append(f"parallel.pipeline_parallel_size={p} needs parallel.engine=ddp "
                        "(DeepSpeed's ZeRO engine runs the whole model)")
    if m.pattern != "sf" * m.num_layers:
        problems.append(f"parallel.pipeline_parallel_size={p}: stages split the plain "
                        "attention/feed-forward pattern (not a sandwich, PAR or "
                        "model.sublayer_pattern)")
    if m.layerdrop or m.layers_to_keep.strip():
        problems.append(f"parallel.pipeline_parallel_size={p}: LayerDrop "
                        "(model.layerdrop, model.layers_to_keep) skips layers the schedule "
                        "expects to run; use pipeline_parallel_size=1")
    if t.precision == "fp16":
        problems.append(f"parallel.pipeline_parallel_size={p}: train.precision=fp16 (loss "
                        "scaling) is not pipelined; use bf16 or fp32")
    if t.compile:
        problems.append(f"parallel.pipeline_parallel_size={p}: train.compile is not "
                        "pipelined")
    if world_size is not None and t.micro_batch_size and world_size % (
            p * par.tensor_parallel_size) == 0:
        dp = world_size // (p * par.tensor_parallel_size)
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        if 0 < micro < p:
            problems.append(f"{micro} micro-batches per step (train.global_batch_size="
                            f"{t.global_batch_size} / (micro_batch_size={t.micro_batch_size}"
                            f" x DP={dp})) are fewer than parallel.pipeline_parallel_size="
                            f"{p} stages: raise global_batch_size or lower micro_batch_size")
    return problems
