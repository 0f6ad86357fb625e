"""One tree of dataclasses for a run: model / parallel / optim / data / train / log.

YAML files hold a subset of the tree; ``key=value`` overrides (dotted, as on the
command line) are applied on top. Every key is checked: an unknown key or a value of
the wrong type is one error that names the file (or override) and the key.

    cfg = load_config("configs/gpt2/tiny-cpu.yaml", ["train.max_steps=50"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_lite.data.blend import blend_text, format_blend, parse_blend, raw_blend
from megatron_lite.files import atomic_write


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


# ---------------------------------------------------------------------------------------
# Sublayer orders
# ---------------------------------------------------------------------------------------


def sandwich_pattern(num_layers: int, k: int) -> str:
    """Press et al. 2019: ``s^k (sf)^(n-k) f^k`` for ``n`` layers; the same sublayers (so the
    same parameters and compute) as ``(sf)^n``, attention moved down and FFNs up."""
    if not 0 <= k <= num_layers:
        raise ConfigError(f"model.sandwich_coefficient={k} must be in [0, model.num_layers="
                          f"{num_layers}]")
    return "s" * k + "sf" * (num_layers - k) + "f" * k


def par_pattern(num_layers: int, ratio: float) -> str:
    """PAR's design rules (Mandava et al. 2020) for ``2n`` blocks with ``p = ratio``.

    ``a = round(2n / p)`` of the blocks are self-attention, the rest feed-forward. The
    attention blocks sit in the lower two thirds of the stack, ``R = round(2n * 2/3)``
    blocks, spread uniformly from the bottom: block ``floor(i * R / a)`` for ``i = 0..a-1``.
    E.g. n = 8, p = 5: a = 3 of 16 blocks, R = 11, attention at 0, 3, 7:
    ``sffsfffsffffffff``.
    """
    blocks = 2 * num_layers
    if ratio < 1:
        raise ConfigError(f"model.par_ratio={ratio} must be >= 1 (blocks per attention block)")
    a, region = round(blocks / ratio), round(blocks * 2 / 3)
    if not 1 <= a <= region:
        raise ConfigError(f"model.par_ratio={ratio}: {a} attention blocks of {blocks} do not "
                          f"fit the lower two thirds ({region} blocks)")
    attn = {i * region // a for i in range(a)}
    return "".join("s" if b in attn else "f" for b in range(blocks))


def layer_units(pattern: str) -> list[tuple[int, int]]:
    """The "layers" of a sublayer pattern: consecutive pairs of sublayers ``[start, end)``
    (an ``sf`` pair in an ordinary stack; the last unit of an odd pattern is one sublayer).
    LayerDrop's ``layer`` granularity, ``layers_to_keep`` and ``prune`` count these."""
    return [(i, min(i + 2, len(pattern))) for i in range(0, len(pattern), 2)]


@dataclass
class ModelConfig:
    arch: str = "gpt"  # gpt | bert (a Llama-family decoder is gpt with its parts, below)
    num_layers: int = 12  # transformer layers (an attention + an FFN sublayer each)
    hidden_size: int = 768  # model width h
    num_attention_heads: int = 12  # heads per attention sublayer (split over TP)
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    seq_length: int = 1024  # tokens per training sample
    max_position_embeddings: int = 1024  # learned position table size
    vocab_size: int = 50257  # the tokenizer's size; padded at build time
    make_vocab_size_divisible_by: int = 128  # x TP size
    hidden_dropout: float = 0.1  # dropout on sublayer outputs and embeddings
    attention_dropout: float = 0.1  # dropout on attention probabilities
    init_std: float = 0.02  # N(0, std) init; residual output layers / sqrt(2N)
    scale_residual_init: bool = True  # the /sqrt(2N) above; false: all N(0, init_std)
    layernorm_epsilon: float = 1e-5  # LayerNorm eps
    normalization: str = "layernorm"  # the norm part: layernorm | rmsnorm (Llama)
    layernorm_order: str = "pre"  # pre (Megatron, GPT-2) | post (original BERT)
    activation: str = "gelu_tanh"  # MLP part: gelu_tanh (GPT-2 gelu_new) | gelu (BERT) | swiglu
    attention_core: str = "sdpa"  # sdpa (flash/fused where available) | math (written out)
    # residual sublayers bottom to top: s = self-attention, f = feed-forward;
    # empty = "sf" * num_layers (ordinary layers). At most one of these three orders:
    sublayer_pattern: str = ""  # e.g. "sfsfsf"; empty: "sf" * num_layers
    sandwich_coefficient: int = 0  # k: s^k (sf)^(n-k) f^k (Press et al. 2019)
    par_ratio: float = 0.0  # p: PAR's rules, round(2n/p) attention blocks in the lower 2/3
    num_tokentypes: int = 2  # BERT segment embeddings
    # Llama-family decoders (megatron_lite/models/rotary.py, norms.py, mlp.py, attention.py)
    num_query_groups: int = 0  # grouped-query attention: K/V heads (0: one per query head)
    add_bias_linear: bool = True  # biases in the attention and MLP linears (Llama: false)
    untie_embeddings_and_output_weights: bool = False  # a separate LM head (Llama: true)
    rope_theta: float = 10000.0  # rotary positions: base of the frequencies (rope only)
    rope_scaling: str = "none"  # rotary positions: none | linear (position interpolation)
    rope_scaling_factor: float = 1.0  # rope_scaling=linear: positions divided by this
    activation_checkpointing: str = "none"  # none | full | selective
    loss_chunk_tokens: int = 256  # output layer + loss per chunk of tokens, no full logits; 0: off
    # Transformer-XL (Dai et al. 2019), GPT only: relative positions and segment memory
    position_embedding: str = "learned"  # learned (GPT-2) | relative | rope (Llama)
    mem_len: int = 0  # memory of past positions per attention sublayer (relative only)
    clamp_len: int = 0  # cap relative distances (0: no cap)
    # adaptive attention span (Sukhbaatar et al. 2019), on relative positions + memory
    adaptive_span: bool = False  # learn each head's span (needs relative positions)
    attn_span: int = 0  # S, the largest span; the memory keeps the last S positions
    adaptive_span_ramp: int = 32  # R, the soft mask's ramp
    adaptive_span_init: float = 0.0  # initial span, a fraction of S
    adaptive_span_loss: float = 2e-6  # lambda of the L1 penalty lambda * sum(z)
    # LayerDrop (Fan et al. 2019): skip each layer with probability p in training
    layerdrop: float = 0.0  # p: skip each layer with this probability in training
    layerdrop_granularity: str = "layer"  # layer (a pair of sublayers) | sublayer
    layerdrop_keep_ends: bool = False  # never drop the first and the last layer
    layers_to_keep: str = ""  # "0,2,4,6": run only these layers (prune without a checkpoint)

    @property
    def residual_output_std(self) -> float:
        """The init std of the layers that write into the residual stream (attention's
        projection, the MLP's ``fc2``): init_std / sqrt(2N) with N the layers (GPT-2,
        Megatron; the same number as ``parallel.scaled_normal_init``), or init_std when
        ``scale_residual_init`` is false."""
        if not self.scale_residual_init:
            return self.init_std
        return self.init_std / math.sqrt(2.0 * (len(self.pattern) / 2))

    @property
    def pattern(self) -> str:
        """The sublayer string this config builds (see :func:`sandwich_pattern`,
        :func:`par_pattern`)."""
        if self.sublayer_pattern:
            return self.sublayer_pattern
        if self.sandwich_coefficient:
            return sandwich_pattern(self.num_layers, self.sandwich_coefficient)
        if self.par_ratio:
            return par_pattern(self.num_layers, self.par_ratio)
        return "sf" * self.num_layers

    @property
    def kept_layers(self) -> list[int] | None:
        """``layers_to_keep`` as indices of :func:`layer_units`, or None (all layers)."""
        if not self.layers_to_keep.strip():
            return None
        try:
            return [int(x) for x in self.layers_to_keep.split(",")]
        except ValueError:
            raise ConfigError(f"model.layers_to_keep={self.layers_to_keep!r}: expected "
                              "layer indices like 0,2,4") from None

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        """K/V heads of an attention sublayer (``num_query_groups``, else one per head)."""
        return self.num_query_groups or self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1  # data-parallel size = world size / TP
    engine: str = "ddp"  # ddp | deepspeed
    distributed_optimizer: bool = False  # ddp: masters + Adam sharded over DP (Megatron's)
    zero_stage: int = 1  # parallel.engine=deepspeed: ZeRO stage 1 (optimizer state) or 2 (+ grads)
    ddp_bucket_mb: float = 25.0  # DDP: gradient bucket size (MiB), each all-reduced as it fills
    zero_bucket_elements: int = 50_000_000  # deepspeed: reduce/all-gather bucket (elements)
    zero_overlap_comm: bool = False  # deepspeed: overlap gradient reduction with backward
    # Korthikanti et al. 2022: norms, dropouts and residuals split over TP along the
    # sequence (same communication bytes); worth it whenever TP > 1 (no-op at TP=1)
    sequence_parallel: bool = False  # split activations between TP cores along the sequence
    # pipeline parallelism (TP innermost, then DP, then PP): stages of consecutive layers
    pipeline_parallel_size: int = 1  # PP stages; data-parallel size = world / (TP x PP)
    pipeline_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | gpipe (torch's schedules)
    virtual_pipeline_size: int = 1  # interleaved_1f1b: model chunks per stage (V)
    pipeline_layers: str = ""  # layers per stage, e.g. "5,5,6" (default: an even split)


@dataclass
class OptimConfig:
    lr: float = 1.5e-4  # peak learning rate (after warmup)
    min_lr: float = 1e-5  # the learning rate at the end of the decay
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases, norms)
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0: off)
    warmup_steps: int = 0  # linear warmup steps
    decay_style: str = "cosine"  # cosine | linear | constant
    # on a resume, follow this config's schedule (lr, min_lr, warmup, decay, max_steps)
    # instead of the checkpoint's when they differ
    override_schedule: bool = False  # resume: follow this config's schedule, not the saved


@dataclass
class DataConfig:
    data_path: str | None = None  # a shard prefix (no .bin/.idx) or a blend "W1 PREFIX1 W2 PREFIX2"
    valid_data_path: str | None = None  # validation: a prefix or blend read whole (else data.split)
    test_data_path: str | None = None  # test: a prefix or blend read whole (else data.split)
    split: str = "949,50,1"  # train,valid,test weights over documents
    tokenizer_type: str | None = None  # GPT2BPETokenizer | BertWordPieceLowerCase | ...
    vocab_file: str | None = None  # vocab.json (BPE) or vocab.txt (WordPiece)
    merge_file: str | None = None  # merges.txt (GPT-2 BPE)
    tokenizer_model: str | None = None  # a SentencePiece model file
    ordering: str = "shuffled"  # GPT samples: shuffled | consecutive (lanes, Transformer-XL)
    # BERT
    masked_lm_prob: float = 0.15  # BERT: share of tokens masked
    max_predictions_per_seq: int = 0  # 0: round(masked_lm_prob * seq_length)
    short_seq_prob: float = 0.1  # BERT: share of samples with a shorter target length
    whole_word_masking: bool = False  # BERT: mask every piece of a chosen word


@dataclass
class TrainConfig:
    micro_batch_size: int = 4  # samples per forward on each DP rank; auto (0): probe the largest
    global_batch_size: int = 8  # samples per optimizer step (accumulation fills it)
    global_batch_tokens: int = 0  # tokens per step instead (resolved to samples at start)
    memory_budget: str = ""  # micro_batch_size=auto: bytes to fit ("4GiB"; GPU: its memory)
    max_steps: int = 100  # optimizer steps of the run (and of the LR schedule)
    seed: int = 1234  # model init, data order, dropout
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast over fp32 weights)
    params_dtype: str = "fp32"  # bf16: Megatron's mixed precision (training/mixed.py)
    compile: bool = False  # torch.compile each sublayer and the GPT loss (training/compile.py)
    log_interval: int = 10  # steps between metrics lines
    sample_interval: int = 0  # GPT: a short greedy sample printed every N steps (0: off)
    eval_interval: int = 100  # steps between validations (0: none)
    eval_iters: int = 10  # global batches per validation
    save_interval: int = 0  # 0: only at the end
    keep_checkpoints: int = 3  # newest checkpoints kept in run_dir/checkpoints
    async_save: bool = False  # write checkpoints in the background (one in flight)
    run_dir: str = "runs/default"  # config.yaml, metrics.jsonl, loss.png, checkpoints/
    load: str | None = None  # a checkpoint to start from; a run_dir with one resumes itself
    finetune: bool = False  # train.load: its weights only (fresh optimizer, step 0, schedule)
    exit_after: int = 0  # stop (with a checkpoint) after this many steps of this process
    divergence_guard: bool = False  # on a NaN/inf or spiking loss reload the last checkpoint
    divergence_factor: float = 5.0  # a spike: loss > factor x the recent mean (log V at first)
    divergence_window: int = 20  # steps in that mean
    divergence_lr_scale: float = 0.5  # each recovery multiplies the learning rate by this
    divergence_retries: int = 3  # recoveries before the run gives up
    # BERT two-phase schedule: from phase2_start * max_steps on, train at phase2_seq_length
    phase2_seq_length: int = 0  # BERT: from phase2_start on, train at this length (0: off)
    phase2_start: float = 0.9  # BERT: phase 2 from this fraction of max_steps


@dataclass
class SearchConfig:
    """``python -m megatron_lite.search``: PAR's supernet (megatron_lite/experiments/)."""

    blocks: int = 0  # mixed blocks; 0: 2 x model.num_layers
    branches: str = "sfi"  # of s (self-attention), f (feed-forward), i (identity)
    arch_lr: float = 1e-2  # the paper's architecture optimizer: lr 1e-2, weight decay 5e-4
    arch_weight_decay: float = 5e-4  # the architecture optimizer's weight decay
    freeze_steps: int = 100  # alpha frozen this long (the paper: 10k of its steps)
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed exponentially ...
    tau_end: float = 0.1  # ... to this at train.max_steps
    hard: bool = False  # straight-through one-hot weights
    window: int = 50  # converged: the argmax of `fraction` of the blocks unchanged
    fraction: float = 0.9  # for `window` steps (after the freeze)


@dataclass
class DistillConfig:
    """``python -m megatron_lite.distill``: MiniLM / MiniLMv2 (megatron_lite/experiments/)."""

    teacher: str = ""  # a megatron-lite run or checkpoint (any TP), or a Hugging Face folder
    method: str = "minilmv2"  # minilm (attention + value relations) | minilmv2 (Q-Q, K-K, V-V)
    relation_heads: int = 0  # minilmv2: relation heads; 0: the student's attention heads
    teacher_layer: int = -1  # the teacher's attention layer distilled (-1: its last)
    assistant: str = ""  # a config: distil teacher -> assistant -> student (MiniLM 3.3)
    # the student's own LM/MLM loss is added at this weight; unset: 0.5 for a GPT student
    # (its LM head is its output: relations alone never train it), 0 for BERT (MiniLM's
    # task-agnostic relations only; its MLM head is not what fine-tuning uses)
    lm_weight: float | None = None  # the student's own loss's weight (unset: GPT 0.5, BERT 0)


@dataclass
class LogConfig:
    tensorboard: bool = True  # also write TensorBoard events to run_dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; offline by default)
    wandb_project: str = "megatron-lite"  # log.wandb: the W&B project (WANDB_MODE=online syncs)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        # which keys a file or an override set, and where ("section.key" -> "FILE" or
        # "override 'k=v'"): not part of the tree, for messages and explicit-value checks
        self.explicit: dict[str, str] = {}
        self.resolved = False  # set by megatron_lite.resolve.resolve_config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        """Every value choice or combination that cannot work, one message each.

        The model's parts (position scheme, attention core, normalization, MLP) check
        their own keys (:mod:`megatron_lite.models.registry`), and the parallel layout
        (TP x DP over a world size) is checked by :func:`megatron_lite.resolve.check_config`,
        which adds both to these.
        """
        problems = _value_problems(self)
        for key, allowed in CHOICES.items():
            value = _get(self, key)
            if value not in allowed:
                problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}")
        m = self.model
        problems += _order_problems(m)
        if m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups:
            problems.append(f"model.num_query_groups={m.num_query_groups} must divide "
                            f"model.num_attention_heads={m.num_attention_heads}")
        if m.untie_embeddings_and_output_weights and m.arch != "gpt":
            problems.append("model.untie_embeddings_and_output_weights is for model.arch=gpt")
        if m.untie_embeddings_and_output_weights and self.parallel.pipeline_parallel_size > 1:
            problems.append("model.untie_embeddings_and_output_weights with "
                            "parallel.pipeline_parallel_size > 1 is not built (the last stage "
                            "holds the tied head only)")
        if m.query_groups != m.num_attention_heads and m.position_embedding == "relative":
            problems.append("model.num_query_groups (grouped-query attention) is not built for "
                            "model.position_embedding=relative")
        t = self.train
        if self.parallel.engine == "deepspeed" and self.parallel.zero_stage not in (1, 2):
            problems.append(f"parallel.zero_stage={self.parallel.zero_stage} is not 1 or 2 "
                            "(ZeRO-3 would partition the TP shards themselves)")
        if self.parallel.ddp_bucket_mb <= 0 or self.parallel.zero_bucket_elements <= 0:
            problems.append("parallel.ddp_bucket_mb and parallel.zero_bucket_elements must be > 0")
        if self.parallel.engine != "deepspeed" and self.parallel.zero_stage != 1:
            problems.append("parallel.zero_stage is for parallel.engine=deepspeed")
        if self.parallel.distributed_optimizer and self.parallel.engine != "ddp":
            problems.append("parallel.distributed_optimizer is for parallel.engine=ddp "
                            "(DeepSpeed's ZeRO shards its own optimizer state)")
        if t.params_dtype == "bf16" and (t.precision != "bf16"
                                         or self.parallel.engine != "ddp"):
            problems.append("train.params_dtype=bf16 needs train.precision=bf16 and "
                            "parallel.engine=ddp (DeepSpeed's bf16 keeps its own masters)")
        problems += _sequence_parallel_problems(self)
        if t.phase2_seq_length and m.arch != "bert":
            problems.append("train.phase2_seq_length is for model.arch=bert only")
        if t.phase2_seq_length and not 0.0 <= t.phase2_start < 1.0:
            problems.append(f"train.phase2_start={t.phase2_start} must be in [0, 1)")
        if t.phase2_seq_length and t.phase2_seq_length > m.max_position_embeddings:
            problems.append(f"train.phase2_seq_length={t.phase2_seq_length} exceeds "
                            f"model.max_position_embeddings={m.max_position_embeddings}")
        if self.data.ordering == "consecutive" and m.arch != "gpt":
            problems.append("data.ordering=consecutive is for GPT only")
        problems += _blend_problems(self.data)
        return problems

    def validate(self) -> Config:
        """Raise one :class:`ConfigError` naming every problem of :meth:`problems`."""
        if problems := self.problems():
            raise ConfigError("; ".join(problems))
        return self


def _sequence_parallel_problems(cfg: Config) -> list[str]:
    """``parallel.sequence_parallel`` at TP > 1: the training sequence splits evenly, and
    no memory or relative positions (their inputs are built from the whole segment on
    every rank; evaluation and generation of other lengths run plain TP by themselves)."""
    m, t, tp = cfg.model, cfg.train, cfg.parallel.tensor_parallel_size
    if not cfg.parallel.sequence_parallel or tp <= 1:
        return []
    problems = []
    for key, seq in (("model.seq_length", m.seq_length),
                     ("train.phase2_seq_length", t.phase2_seq_length)):
        if seq and seq % tp:
            problems.append(f"parallel.sequence_parallel needs {key}={seq} divisible by "
                            f"parallel.tensor_parallel_size={tp}")
    if m.position_embedding == "relative":
        problems.append(f"parallel.sequence_parallel does not support model.position_embedding="
                        f"{m.position_embedding} (Transformer-XL's memory and the adaptive span "
                        "attend over the whole segment of every rank)")
    if tp > m.query_groups:
        problems.append(f"parallel.sequence_parallel with TP={tp} above model.num_query_groups="
                        f"{m.query_groups} (K/V heads shared by TP ranks) is not built")
    return problems


# sizes that must be >= 1 (a model of no layers, or a batch of no samples, is a typo)
POSITIVE = ("model.num_layers", "model.hidden_size", "model.num_attention_heads",
            "model.seq_length", "model.max_position_embeddings", "model.vocab_size",
            "model.make_vocab_size_divisible_by", "model.num_tokentypes",
            "train.global_batch_size", "parallel.pipeline_parallel_size",
            "parallel.virtual_pipeline_size")
NON_NEGATIVE = ("train.micro_batch_size", "train.global_batch_tokens", "train.max_steps",
                "train.log_interval", "train.eval_interval", "train.eval_iters",
                "train.save_interval", "train.keep_checkpoints", "train.exit_after",
                "train.sample_interval",
                "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.clip_grad",
                "optim.warmup_steps", "optim.adam_eps", "model.num_query_groups",
                "model.loss_chunk_tokens")
FRACTIONS = ("model.hidden_dropout", "model.attention_dropout")  # in [0, 1)


def _value_problems(cfg: Config) -> list[str]:
    """Floats that are not finite, sizes that are not positive, probabilities not in [0, 1)."""
    problems = []
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{section.name}.{f.name}={value} must be a finite number")
    for key in POSITIVE:
        if (value := _get(cfg, key)) < 1:
            problems.append(f"{key}={value} must be >= 1")
    for key in NON_NEGATIVE:
        if (value := _get(cfg, key)) < 0:
            problems.append(f"{key}={value} must be >= 0")
    if cfg.model.ffn_hidden_size is not None and cfg.model.ffn_hidden_size < 1:
        problems.append(f"model.ffn_hidden_size={cfg.model.ffn_hidden_size} must be >= 1 "
                        "(or left out: 4 x hidden_size)")
    for key in FRACTIONS:
        if not 0.0 <= (value := _get(cfg, key)) < 1.0:
            problems.append(f"{key}={value} must be in [0, 1)")
    return problems


BLEND_KEYS = ("data.data_path", "data.valid_data_path", "data.test_data_path")


def _blend_problems(d: DataConfig) -> list[str]:
    """Blends that cannot be read (:func:`megatron_lite.data.blend.parse_blend`), and a
    blend where one stream is read in order."""
    problems = []
    for dotted in BLEND_KEYS:
        value = getattr(d, dotted.split(".")[1])
        if value is None:
            continue
        try:
            sources = parse_blend(value, dotted)
        except ValueError as err:
            problems.append(str(err))
            continue
        if len(sources) > 1 and d.ordering == "consecutive":
            problems.append(f"{dotted} is a blend of {len(sources)} corpora, but "
                            "data.ordering=consecutive reads one corpus in order: give one "
                            "prefix")
    return problems


def _order_problems(m: ModelConfig) -> list[str]:
    """Sublayer order, LayerDrop and layers_to_keep settings that cannot work."""
    problems = []
    generated = {}
    if m.sandwich_coefficient:
        generated["model.sandwich_coefficient"] = m.sandwich_coefficient
    if m.par_ratio:
        generated["model.par_ratio"] = m.par_ratio
    if len(generated) > 1:
        problems.append("model.sandwich_coefficient and model.par_ratio are two sublayer "
                        "orders: give one")
    try:
        pattern = m.pattern
        if m.sublayer_pattern and generated:
            # config.yaml of a run holds the chosen pattern next to the key it came from
            key, value = next(iter(generated.items()))
            tmp = dataclasses.replace(m, sublayer_pattern="")
            if tmp.pattern != m.sublayer_pattern:
                problems.append(f"model.sublayer_pattern={m.sublayer_pattern!r} and {key}="
                                f"{value} give different orders: give one")
    except ConfigError as err:
        return problems + [str(err)]
    if (not pattern and (m.sublayer_pattern or m.num_layers >= 1)) or set(pattern) - {"s", "f"}:
        problems.append(f"model.sublayer_pattern={m.sublayer_pattern!r} may only hold "
                        "'s' (self-attention) and 'f' (feed-forward)")
    if not 0.0 <= m.layerdrop < 1.0:
        problems.append(f"model.layerdrop={m.layerdrop} must be in [0, 1)")
    try:
        kept, units = m.kept_layers, -(-len(pattern) // 2)  # len(layer_units(pattern))
    except ConfigError as err:
        return problems + [str(err)]
    if kept is not None:
        bad = [i for i in kept if not 0 <= i < units]
        if bad:
            problems.append(f"model.layers_to_keep={m.layers_to_keep!r}: layer {bad[0]} out of "
                            f"range (the model has layers 0..{units - 1})")
        elif len(set(kept)) != len(kept):
            problems.append(f"model.layers_to_keep={m.layers_to_keep!r} repeats a layer")
    return problems


CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("gpt", "bert"),
    "model.layerdrop_granularity": ("layer", "sublayer"),
    "data.ordering": ("shuffled", "consecutive"),
    "model.activation_checkpointing": ("none", "full", "selective"),
    "model.layernorm_order": ("pre", "post"),
    "parallel.engine": ("ddp", "deepspeed"),
    "parallel.pipeline_schedule": ("1f1b", "interleaved_1f1b", "gpipe"),
    "optim.decay_style": ("cosine", "linear", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.params_dtype": ("fp32", "bf16"),
    "distill.method": ("minilm", "minilmv2"),
}


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation (int, float, str, bool, X | None)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if value is None and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # NOTE: YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the float it means
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. split: 949,50,1 written without quotes stays a string
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")


# keys that are gone, with the default every config.yaml of their time holds (read and
# ignored at that value; any other value is an error naming the key)
REMOVED: dict[str, Any] = {"train.inject_nan_at_step": 0, "train.inject_nan_times": 1,
                           "train.fail_at_step": 0, "train.fail_rank": 0}


def _did_you_mean(section: str, key: str) -> str:
    """`` (did you mean section.k?)`` for the closest known key (of this section, else of
    any section: a key put in the wrong section), or ``""``."""
    fields = {f.name: f.name for f in dataclasses.fields(getattr(Config(), section))}
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {section}.{close[0]}?)"
    everywhere = {f"{s.name}.{f.name}": f.name for s in dataclasses.fields(Config)
                  for f in dataclasses.fields(getattr(Config(), s.name))}
    same = [dotted for dotted, name in everywhere.items() if name == key]
    if same:
        return f" (did you mean {same[0]}?)"
    return ""


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    node = getattr(cfg, section, None)
    if not dataclasses.is_dataclass(node) or section.startswith("_"):
        names = [f.name for f in dataclasses.fields(Config)]
        close = difflib.get_close_matches(section, names, n=1)
        hint = f"did you mean {close[0]}.{key}? " if close else ""
        raise ConfigError(f"{where}: unknown section {section!r} ({hint}known: "
                          f"{', '.join(names)})")
    hints = typing.get_type_hints(type(node))
    if f"{section}.{key}" in REMOVED:
        if value == REMOVED[f"{section}.{key}"]:
            return  # every config.yaml written before holds it, at this default: ignored
        raise ConfigError(f"{where}: {section}.{key} is no longer a config key (test-only "
                          "fault injection: tests install a TrainingHook, megatron_lite/hooks.py)")
    if key not in hints:
        raise ConfigError(f"{where}: unknown key {section}.{key}{_did_you_mean(section, key)}")
    if f"{section}.{key}" == "train.micro_batch_size" and value == "auto":
        value = 0  # probed at start (megatron_lite/training/probe.py)
    if f"{section}.{key}" in BLEND_KEYS and isinstance(value, list):
        try:  # YAML's list of {weight, path}: the string form ("W1 PREFIX1 W2 PREFIX2")
            value = blend_text(value, f"{section}.{key}")
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    setattr(node, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))
    cfg.explicit[f"{section}.{key}"] = where


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from a YAML file and ``section.key=value`` overrides.

    Args:
        path: YAML file with top-level sections (``model:``, ``train:``, ...), or None.
        overrides: strings like ``"train.max_steps=50"``; values are parsed as YAML.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            problem = getattr(err, "problem", None) or "parse error"
            raise ConfigError(f"{path}:{line} invalid YAML ({problem})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in tree.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, str(section), str(key), value, str(path))
    for item in overrides or []:
        dotted, sep, raw = item.partition("=")
        if not sep or dotted.count(".") != 1:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, key = dotted.split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "parse error"
            raise ConfigError(f"override {item!r}: not a YAML value ({problem}); quote it, "
                              f"e.g. {dotted}='\"...\"'") from None
        _apply(cfg, section, key, value, f"override {item!r}")
    return cfg


PATH_KEYS = ("data.vocab_file", "data.merge_file", "data.tokenizer_model",
             "train.run_dir", "train.load")


def resolve_paths(cfg: Config) -> Config:
    """Make every path key absolute (relative to the current directory), so the
    ``config.yaml`` a run writes works from any directory later. In place; returns cfg."""
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, os.path.abspath(os.path.expanduser(value)))
    for dotted in BLEND_KEYS:  # each prefix of a blend (an unreadable one: left for the check)
        key = dotted.split(".")[1]
        value = getattr(cfg.data, key)
        try:
            parse_blend(value, dotted) if value else None
        except ValueError:
            continue
        if value:
            setattr(cfg.data, key, format_blend(
                [(w, os.path.abspath(os.path.expanduser(p))) for w, p in raw_blend(value)]))
    return cfg


def save_config(cfg: Config, path: str | Path, comment: str = "") -> None:
    """Write the resolved config as YAML (atomically: see :mod:`megatron_lite.files`),
    after ``comment`` as ``# ...`` lines (what made it; ignored when it is loaded)."""
    with atomic_write(path) as f:
        f.writelines(f"# {line}\n" for line in comment.splitlines())
        f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
