"""Run metrics: a console line, ``metrics.jsonl``, TensorBoard events, a loss-curve PNG."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import uuid
from pathlib import Path

import torch

from megatron_lite.config import ConfigError
from megatron_lite.devices import device_for_cuda_name
from megatron_lite.files import atomic_path, atomic_write
from megatron_lite.models.positions import position_scheme
from megatron_lite.models.registry import MLPS


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """The device's dense peak FLOP/s for ``precision`` (fp32, else the 16-bit tensor-core
    peak), for the MFU estimate; None for a device not in :data:`megatron_lite.devices.DEVICES`."""
    if device.type != "cuda":
        return None
    known = device_for_cuda_name(torch.cuda.get_device_name(device))
    if known is None:
        return None
    return known.fp32 if precision == "fp32" else known.bf16


def model_flops_per_step(cfg, global_batch: int, seq: int) -> float:
    """Forward + backward FLOPs of one step (Narayanan et al. 2021), activations not recomputed.

    Per token, forward: an attention sublayer ``8h^2 + 4sh`` (QKV and output projections,
    scores and context; fewer K/V heads under grouped-query attention), a feed-forward one
    ``4h * ffn`` (SwiGLU's three matrices ``6h * ffn``), the logits ``2hV``; an ordinary
    layer is their sum. Counts every sublayer of the pattern (sandwich, PAR), LayerDrop's
    skipped ones too (the expected cost is lower by about ``p``).
    """
    h, pattern, vocab = cfg.hidden_size, cfg.pattern, cfg.vocab_size
    # the attention's depends on the position scheme (Transformer-XL's memory, W_R)
    attention, ffn = position_scheme(cfg).attention_flops(seq), MLPS.of(cfg).flops(cfg)
    per_token = pattern.count("s") * attention + pattern.count("f") * ffn + 2 * h * vocab
    return 3 * global_batch * seq * per_token


class MetricsLogger:
    """Writes on the main rank only; every method is a no-op elsewhere.

    ``step`` is where the run starts. A run resumed at step S keeps the records up to S
    and drops later ones (logged after the checkpoint it resumes from), so the steps of
    ``metrics.jsonl`` and TensorBoard never repeat. A run that starts at step 0 in a
    folder that already holds metrics (an earlier attempt that never saved a checkpoint)
    moves them beside it (``metrics.1.jsonl``, ``tensorboard.1/``) and starts afresh.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, step: int = 0,
                 wandb: dict | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if enabled:
            self._continue_from(step)
        if enabled and wandb is not None:
            self.wandb = start_wandb(self.run_dir, **wandb, step=step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events after the resumed step
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                        purge_step=step + 1 if step else None)
            except ImportError:  # tensorboard missing: jsonl and the plot still work
                self.tb = None

    def _continue_from(self, step: int) -> None:
        if not self.path.exists():
            return
        if step == 0:
            n = 1
            while (self.run_dir / f"metrics.{n}.jsonl").exists() or \
                    (self.run_dir / f"tensorboard.{n}").exists():
                n += 1
            self.path.rename(self.run_dir / f"metrics.{n}.jsonl")
            if (self.run_dir / "tensorboard").is_dir():
                (self.run_dir / "tensorboard").rename(self.run_dir / f"tensorboard.{n}")
            print(f"{self.run_dir} held metrics of an earlier start without a checkpoint: "
                  f"moved to metrics.{n}.jsonl", flush=True)
            return
        self.rewind(step)

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a resume, or the divergence guard going back)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill
        with atomic_write(self.path) as f:
            f.writelines(kept)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # NaN/inf (a skipped fp16 step's grad norm) become null: strict JSON for jq & co.
        line = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and not isinstance(v, bool)
                   and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        parts = [f"step {record['step']:>6}"]
        for key, fmt in (("loss", ".4f"), ("kl", ".4f"), ("lm_loss", ".4f"),
                         ("mlm_accuracy", ".3f"), ("nsp_accuracy", ".3f"),
                         ("val_loss", ".4f"), ("val_ppl", ".1f"), ("val_mlm_accuracy", ".3f"),
                         ("val_nsp_accuracy", ".3f"), ("lr", ".2e"),
                         ("grad_norm", ".3f"), ("tokens_per_sec", ".0f"), ("tflops", ".2f"),
                         ("mfu", ".1%"), ("loss_scale", ".0f")):
            if key in record:
                parts.append(f"{key} {record[key]:{fmt}}")
        print(" | ".join(parts), flush=True)

    def close(self) -> Path | None:
        """Flush TensorBoard and draw ``loss.png`` (train and validation loss)."""
        if not self.enabled:
            return None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        return plot_losses(self.path, self.run_dir / "loss.png")


def start_wandb(run_dir: Path, project: str, config: dict, step: int = 0):
    """A Weights & Biases run for ``log.wandb=true``: offline unless ``WANDB_MODE`` says
    otherwise (no network needed; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads
    later), its files under ``RUN_DIR/wandb``, one W&B run per start of the run folder
    (its id kept in ``RUN_DIR/wandb/run_id``, so a run resumed at ``step`` > 0 continues
    it; a fresh start at step 0, whose earlier metrics were moved aside, gets a new one:
    W&B drops steps logged below a run's last). Imported only here: the package is
    optional (:func:`check_wandb` refuses a run without it first)."""
    import wandb

    folder = run_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    run_id = id_file.read_text().strip() if step > 0 and id_file.is_file() \
        else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow",
                      dir=str(run_dir), config=config,
                      mode=os.environ.get("WANDB_MODE", "offline"))


def check_wandb() -> None:
    """``log.wandb=true`` without the package: one error, before the run writes anything."""
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or "
                          "pip install -e '.[wandb]'), or log.wandb=false")


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
