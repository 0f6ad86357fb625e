"""DeepSpeed ZeRO stage 1/2 as the data-parallel engine, under megatron-lite's own TP.

``parallel.engine=deepspeed`` hands the model and our AdamW (same weight-decay groups as
the DDP engine) to ``deepspeed.initialize``. DeepSpeed then owns what DDP owned: the
gradient reduction over the DP group (reduce-scatter into partitions for stage 2),
the fp32 master weights and Adam moments (partitioned over DP), gradient clipping and
bf16. Tensor parallelism stays ours: DeepSpeed learns the TP and DP groups through a
model-parallel unit (:class:`ModelParallelUnit`, the ``mpu`` interface of Megatron),
and reads ``tensor_model_parallel`` on sharded parameters to count replicated ones once
in the gradient norm.

Checkpoints keep the run-directory layout of the DDP engine: each DP rank writes its
partition of the fp32 master weights and Adam moments as pieces of the same global
per-parameter tensors (``megatron_lite.checkpoint``, through the fragments of
:class:`_DeepSpeedZeroInternals`), so a ZeRO checkpoint loads at any TP/DP size, under
either engine, and converts to HF like any other. :meth:`ZeroEngine.checkpoint_state`
(the gathered full form) remains for tests and tools.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.optim_state import (
    gather_param_state,
    group_hyperparameters,
    load_group_hyperparameters,
    shard_param_state,
    step_on_device,
)
from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.parallel.state_dict import gather_like, shard_like


def import_deepspeed(device: torch.device):
    """``deepspeed`` for training on ``device``, or a clear error when it is not installed."""
    if device.type == "cpu":  # say so, rather than let DeepSpeed guess (and warn)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's ZeRO still calls this deprecated collective; the warning is not ours to fix
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import deepspeed
    except ImportError as err:
        raise ConfigError("parallel.engine=deepspeed needs DeepSpeed: pip install "
                          f"'megatron-lite[deepspeed]' ({err})") from None
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


class ModelParallelUnit:
    """Megatron's ``mpu`` interface over a :class:`ParallelContext`.

    DeepSpeed's "model parallel" is our TP; there is no pipeline (DeepSpeed asks for its
    group only when its size is above one). DeepSpeed needs real groups where the context
    says ``None`` (a dimension of size one), so single-rank groups are made, only then
    (collective: every rank builds every group).
    """

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        world = ctx.world_size
        own = None
        for r in range(world) if ctx.tp_group is None or ctx.dp_group is None else []:
            group = dist.new_group([r])
            own = group if r == ctx.rank else own
        self.tp_group = ctx.tp_group if ctx.tp_group is not None else own
        self.dp_group = ctx.dp_group if ctx.dp_group is not None else own
        self.pp_group = own
        self.dp_ranks = list(range(ctx.rank % ctx.tp_size, world, ctx.tp_size))

    # tensor ("model") parallel
    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ctx.rank - self.ctx.tp_rank

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_ranks

    # no pipeline parallelism
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.pp_group


def deepspeed_config(cfg: Config, ctx: ParallelContext) -> dict:
    """The DeepSpeed config dict our config implies (batch sizes, ZeRO stage, precision)."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * ctx.dp_size),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.parallel.zero_stage,
                              "reduce_bucket_size": cfg.parallel.zero_bucket_elements,
                              "allgather_bucket_size": cfg.parallel.zero_bucket_elements,
                              "overlap_comm": cfg.parallel.zero_overlap_comm},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


class _DeepSpeedZeroInternals:
    """Every use of DeepSpeed's private ZeRO-1/2 optimizer state, in one place.

    NOTE: read from DeepSpeed 0.19 (``deepspeed/runtime/zero/stage_1_and_2.py``,
    ``DeepSpeedZeroOptimizer``, and ``utils/mixed_precision_linkage.py`` for
    ``_hp_mapping``); the ``deepspeed`` extra pins ``>=0.19,<0.20``. A DeepSpeed upgrade
    needs a look at these attributes, and ``tests/training/test_deepspeed.py`` checks
    them against the DDP engine.
    """

    def __init__(self, zero_optimizer):
        self.zero = zero_optimizer

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer we passed in (our AdamW), now stepping the flat fp32 partitions."""
        return self.zero.optimizer

    def partitions(self):
        """(this rank's flat fp32 partition, the parameters it covers, its DP group) per group."""
        z = self.zero
        return [(z.single_partition_of_fp32_groups[g], z.bit16_groups[g],
                 z.real_dp_process_group[g]) for g in range(len(z.bit16_groups))]

    @staticmethod
    def fragment(p) -> tuple[int, int, int] | None:
        """(start in ``p`` flattened, start in the flat partition, length) of the piece of
        ``p`` this rank's partition holds; None when it holds none."""
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            return None
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        return lp.start, hp.start, lp.numel

    def overflow(self) -> bool:
        """Whether the last step was skipped for an fp16 overflow."""
        return bool(getattr(self.zero, "overflow", False))

    @property
    def loss_scaler(self):
        return self.zero.loss_scaler

    @property
    def loss_scale(self) -> float:
        return float(self.zero.loss_scale)


class ZeroEngine:
    """A model and its optimizer inside a DeepSpeed engine.

    Per micro-batch: ``loss = engine(**batch)``, :meth:`backward`, :meth:`step` (DeepSpeed
    steps the optimizer at the accumulation boundary only). Checkpoints go through
    :meth:`checkpoint_state` / :meth:`load_checkpoint_state`.
    """

    def __init__(self, model, optimizer, cfg: Config, ctx: ParallelContext):
        deepspeed = import_deepspeed(ctx.device)
        from deepspeed.accelerator import get_accelerator

        if cfg.train.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise ConfigError("train.precision=fp16 with parallel.engine=deepspeed: DeepSpeed's "
                              f"{get_accelerator().device_name()} accelerator has no fp16 here "
                              "(use bf16 or fp32)")
        if not dist.is_initialized():  # a one-process job: DeepSpeed still wants a group
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.ctx, self.model = ctx, model
        for p in model.parameters():  # what DeepSpeed reads to count TP shards in norms
            p.tensor_model_parallel = getattr(p, "tp_dim", None) is not None
        self.mpu = ModelParallelUnit(ctx)
        with contextlib.redirect_stdout(io.StringIO()):
            # the ZeRO optimizer holds flat fp32 partitions per group; ours steps them
            self.engine, zero_optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(cfg, ctx),
                mpu=self.mpu, dist_init_required=False)
        self.internals = _DeepSpeedZeroInternals(zero_optimizer)
        self.base = self.internals.base_optimizer
        self.names = {id(p): n for n, p in model.named_parameters()}

    def __call__(self, **batch):
        return self.engine(**batch)

    def train(self) -> None:
        self.engine.train()

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; DeepSpeed divides by the accumulation steps."""
        self.engine.backward(loss)

    def step(self) -> tuple[float, bool]:
        """Called after every micro-batch; returns (grad norm, stepped) at the boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return float("nan"), False
        norm = self.engine.get_global_grad_norm()
        skipped = self.internals.overflow()
        if skipped or norm is None:  # an fp16 overflow: like the DDP engine, no norm
            return float("nan"), not skipped
        return float(norm), True

    def loss_scale(self) -> float | None:
        return self.internals.loss_scale if self.engine.fp16_enabled() else None

    _SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def loss_scaler_state(self) -> dict | None:
        """DeepSpeed's dynamic fp16 loss scaler, as plain numbers (None unless fp16)."""
        if not self.engine.fp16_enabled():
            return None
        s = self.internals.loss_scaler
        return {k: getattr(s, k) for k in self._SCALER_KEYS if hasattr(s, k)}

    def load_loss_scaler_state(self, state: dict) -> None:
        if self.engine.fp16_enabled():
            for k, v in state.items():
                if k in self._SCALER_KEYS:
                    setattr(self.internals.loss_scaler, k, v)

    @torch.no_grad()
    def clamp_(self, params, low: float, high: float) -> None:
        """Clamp parameters in place, and their fp32 masters in this rank's partitions
        (else the next step would start again from the unclamped masters)."""
        wanted = {id(p) for p in params}
        for flat, group, _ in self.internals.partitions():
            for p in group:
                if id(p) in wanted:
                    if (where := self.internals.fragment(p)) is not None:
                        _, flat_start, n = where
                        flat.narrow(0, flat_start, n).clamp_(low, high)
                    p.clamp_(low, high)

    # ----------------------------------------------------------------------- state

    def _assemble(self, p, flat: torch.Tensor, dp_group) -> torch.Tensor:
        """Parameter ``p``'s slice of ``flat`` on every DP rank, assembled (collective over DP)."""
        buf = torch.zeros(p.numel(), dtype=flat.dtype, device=flat.device)
        if (where := self.internals.fragment(p)) is not None:
            start, flat_start, n = where
            buf.narrow(0, start, n).copy_(flat.narrow(0, flat_start, n))
        return all_reduce(buf, dp_group).view(p.shape)  # the fragments are disjoint

    def _scatter(self, p, value: torch.Tensor, flat: torch.Tensor) -> None:
        """Write this rank's fragment of ``value`` (shaped like ``p``) into ``flat``."""
        if (where := self.internals.fragment(p)) is not None:
            start, flat_start, n = where
            flat.narrow(0, flat_start, n).copy_(value.reshape(-1).narrow(0, start, n))

    @torch.no_grad()
    def checkpoint_state(self) -> tuple[dict, dict]:
        """(full fp32 model state, full optimizer state by name): collective over TP and DP."""
        tp = self.ctx.tp_group
        model_state, optim = {}, {}
        for name, p in self.model.named_parameters():  # any the optimizer does not hold
            if not p.requires_grad:
                model_state[name] = gather_like(p, p, tp)
        for flat, params, dp_group in self.internals.partitions():
            state = self.base.state.get(flat, {})
            for p in params:
                name = self.names[id(p)]
                model_state[name] = gather_like(p, self._assemble(p, flat, dp_group), tp)
                local = {k: self._assemble(p, v, dp_group)
                         if torch.is_tensor(v) and v.shape == flat.shape else v
                         for k, v in state.items()}  # moments: this TP rank's, whole over DP
                optim[name] = gather_param_state(p, local, tp)
        for name, b in self.model.named_buffers():
            model_state[name] = b.detach().clone()
        return model_state, {"state": optim, "param_groups": group_hyperparameters(self.base)}

    @torch.no_grad()
    def load_checkpoint_state(self, model_state: dict, optim_state: dict | None) -> None:
        """Put full (saved) masters and Adam moments into this rank's partitions.

        The model's own (bf16 or fp32) weights are loaded by the caller; this sets the fp32
        masters they are updated from, and creates the optimizer state the way our AdamW
        would have after its last step (no communication).

        Raises:
            KeyError: a parameter has no saved optimizer state.
        """
        tp = self.ctx.tp_group
        for flat, params, _ in self.internals.partitions():
            for p in params:
                master = shard_like(p, model_state[self.names[id(p)]], tp)
                self._scatter(p, master.to(flat.dtype), flat)
        if optim_state is None:
            return
        load_group_hyperparameters(self.base, optim_state["param_groups"])
        on_device = step_on_device(self.base)
        for flat, params, _ in self.internals.partitions():
            state = self.base.state[flat]  # a defaultdict: created when absent
            for p in params:
                name = self.names[id(p)]
                if name not in optim_state["state"]:
                    raise KeyError(f"no optimizer state for {name}")
                local = shard_param_state(p, optim_state["state"][name], tp, flat.device,
                                          on_device)
                for key, value in local.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        if key not in state:
                            state[key] = torch.zeros_like(flat)
                        self._scatter(p, value.to(flat.dtype), state[key])
                    else:  # the step counter, shared by the group
                        state[key] = value
