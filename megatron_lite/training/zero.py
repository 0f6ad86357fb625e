"""DeepSpeed ZeRO stage 1/2 as the data-parallel engine, under megatron-lite's own TP.

``parallel.engine=deepspeed`` hands the model and our AdamW (same weight-decay groups as
the DDP engine) to ``deepspeed.initialize``. DeepSpeed then owns what DDP owned: the
gradient reduction over the DP group (reduce-scatter into partitions for stage 2),
the fp32 master weights and Adam moments (partitioned over DP), gradient clipping and
bf16. Tensor parallelism stays ours: DeepSpeed learns the TP and DP groups through a
model-parallel unit (:class:`ModelParallelUnit`, the ``mpu`` interface of Megatron),
and reads ``tensor_model_parallel`` on sharded parameters to count replicated ones once
in the gradient norm.

Checkpoints keep the run-directory layout of the DDP engine: the fp32 master weights
and Adam moments are gathered from their DP partitions into full per-parameter tensors
(``model.pt``, ``optim.pt`` by parameter name), so a ZeRO checkpoint loads at any
TP/DP size, under either engine, and converts to HF like any other.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import torch
import torch.distributed as dist

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel import ParallelContext
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
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


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
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(cfg, ctx),
                mpu=self.mpu, dist_init_required=False)
        self.base = self.zero.optimizer  # our AdamW, now over the partitions
        self.names = {id(p): n for n, p in model.named_parameters()}

    def __call__(self, **batch):
        return self.engine(**batch)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

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
        skipped = bool(getattr(self.zero, "overflow", False))
        if skipped or norm is None:  # an fp16 overflow: like the DDP engine, no norm
            return float("nan"), not skipped
        return float(norm), True

    def loss_scale(self) -> float | None:
        return float(self.zero.loss_scale) if self.engine.fp16_enabled() else None

    _SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def loss_scaler_state(self) -> dict | None:
        """DeepSpeed's dynamic fp16 loss scaler, as plain numbers (None unless fp16)."""
        if not self.engine.fp16_enabled():
            return None
        s = self.zero.loss_scaler
        return {k: getattr(s, k) for k in self._SCALER_KEYS if hasattr(s, k)}

    def load_loss_scaler_state(self, state: dict) -> None:
        if self.engine.fp16_enabled():
            for k, v in state.items():
                if k in self._SCALER_KEYS:
                    setattr(self.zero.loss_scaler, k, v)

    # ----------------------------------------------------------------------- state

    def _groups(self):
        """(flat fp32 partition, its parameters, its DP group) per optimizer group."""
        z = self.zero
        return [(z.single_partition_of_fp32_groups[g], z.bit16_groups[g],
                 z.real_dp_process_group[g]) for g in range(len(z.bit16_groups))]

    def _full_from_partitions(self, p, flat: torch.Tensor, dp_group) -> torch.Tensor:
        """Parameter ``p``'s slice of ``flat`` on every DP rank, assembled (collective over DP)."""
        buf = torch.zeros(p.numel(), dtype=flat.dtype, device=flat.device)
        m = getattr(p, "_hp_mapping", None)
        if m is not None:
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            buf.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
        dist.all_reduce(buf, group=dp_group)
        return buf.view(p.shape)

    @staticmethod
    def _into_partition(p, value: torch.Tensor, flat: torch.Tensor) -> None:
        """Write this rank's fragment of ``value`` (shaped like ``p``) into ``flat``."""
        m = getattr(p, "_hp_mapping", None)
        if m is not None:
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            flat.narrow(0, hp.start, hp.numel).copy_(
                value.reshape(-1).narrow(0, lp.start, lp.numel))

    @torch.no_grad()
    def checkpoint_state(self) -> tuple[dict, dict]:
        """(full fp32 model state, full optimizer state by name): collective over TP and DP."""
        tp = self.ctx.tp_group
        model_state, optim = {}, {}
        for name, p in self.model.named_parameters():  # any the optimizer does not hold
            if not p.requires_grad:
                model_state[name] = gather_like(p, p, tp)
        for flat, params, dp_group in self._groups():
            state = self.base.state.get(flat, {})
            for p in params:
                name = self.names[id(p)]
                master = self._full_from_partitions(p, flat, dp_group)
                model_state[name] = gather_like(p, master, tp)
                entry = {}
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == flat.shape:
                        full = self._full_from_partitions(p, value, dp_group)
                        entry[key] = gather_like(p, full, tp)
                    else:  # Adam's step counter, shared by the group
                        entry[key] = value.clone() if torch.is_tensor(value) else value
                optim[name] = entry
        for name, b in self.model.named_buffers():
            model_state[name] = b.detach().clone()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.base.param_groups]
        return model_state, {"state": optim, "param_groups": groups}

    @torch.no_grad()
    def load_checkpoint_state(self, model_state: dict, optim_state: dict | None) -> None:
        """Put full (saved) masters and Adam moments into this rank's partitions.

        The model's own (bf16 or fp32) weights are loaded by the caller; this sets the fp32
        masters they are updated from, and creates the optimizer state the way our AdamW
        would have after its last step (no communication).
        """
        tp = self.ctx.tp_group
        for flat, params, _ in self._groups():
            for p in params:
                master = shard_like(p, model_state[self.names[id(p)]], tp)
                self._into_partition(p, master.to(flat.dtype), flat)
        if optim_state is None:
            return
        for group, saved in zip(self.base.param_groups, optim_state["param_groups"],
                                strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        on_device = self.base.defaults.get("fused") or self.base.defaults.get("capturable")
        for flat, params, _ in self._groups():
            state = self.base.state[flat]  # a defaultdict: created when absent
            for p in params:
                name = self.names[id(p)]
                if name not in optim_state["state"]:
                    raise KeyError(f"no optimizer state for {name}")
                for key, value in optim_state["state"][name].items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        if key not in state:
                            state[key] = torch.zeros_like(flat)
                        self._into_partition(p, shard_like(p, value, tp).to(flat.dtype),
                                             state[key])
                    elif torch.is_tensor(value):
                        state[key] = value.to(flat.device) if on_device else value.clone()
                    else:
                        state[key] = value
