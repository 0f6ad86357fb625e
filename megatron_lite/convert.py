"""Convert between Hugging Face models and megatron-lite checkpoints (no downloads).

    python -m megatron_lite.convert --from-hf HF_DIR --to CKPT_DIR [--tp N]
    python -m megatron_lite.convert --from CKPT --to-hf HF_DIR

``HF_DIR`` is a local folder with ``config.json`` and weights (GPT2LMHeadModel,
BertForPreTraining or MegatronBertForPreTraining). ``--to-hf`` writes
``config.json`` + ``model.safetensors``, loadable with ``from_pretrained`` without
megatron-lite. Our checkpoints hold full tensors, so ``--tp`` only records the layout
a run will start with; any TP size can load them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from megatron_lite.cli import run_cli
from megatron_lite.config import Config, load_config, save_config
from megatron_lite.data.tokenizer import TokenizerError
from megatron_lite.files import written_dir
from megatron_lite.parallel import ParallelContext
from megatron_lite.run import build_run, tokenizer_from_config
from megatron_lite.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
)


def _hf_model(hf_dir: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (a local Hugging Face model folder)")
    kind = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    cls = {"gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertForPreTraining,
           "megatron-bert": transformers.MegatronBertForPreTraining}.get(kind)
    if cls is None:
        raise CheckpointError(f"{hf_dir}: model_type {kind!r} is not supported "
                              "(gpt2, bert, megatron-bert)")
    return cls.from_pretrained(str(hf_dir), local_files_only=True).eval()


def from_hf_dir(hf_dir: Path, out: Path, tp: int = 1) -> Path:
    """Write a megatron-lite checkpoint folder holding an HF model's weights."""
    from megatron_lite.models.hf import config_from_hf, hf_to_full_state

    hf = _hf_model(hf_dir)
    cfg = Config()
    cfg.model = config_from_hf(hf.config)
    cfg.parallel.tensor_parallel_size = tp
    state = hf_to_full_state(hf.state_dict(), cfg.model)
    meta = {"format_version": FORMAT_VERSION, "step": 0, "consumed_samples": 0,
            "tokens_seen": 0, "tp_size": tp, "dp_size": 1, "world_size": tp,
            "converted_from": str(hf_dir)}
    with written_dir(out) as tmp:
        torch.save(state, tmp / "model.pt")
        save_config(cfg, tmp / "config.yaml")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def to_hf_dir(ckpt: Path, out: Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a megatron-lite checkpoint.

    The end-of-text id (GPT-2's ``bos``/``eos``) comes from the run's tokenizer; when
    its files cannot be read, a warning says so and the export names none.
    """
    from megatron_lite.models.hf import to_hf

    ckpt = resolve_checkpoint(ckpt)
    cfg = load_config(ckpt / "config.yaml")
    cfg.parallel.tensor_parallel_size = 1  # one process builds the full model
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    try:
        tokenizer_from_config(cfg)
    except TokenizerError as err:
        print(f"warning: {err}: the export names no end-of-text token", file=sys.stderr)
        cfg.data.tokenizer_type = None
    ctx = ParallelContext()
    run = build_run(cfg, ctx, data=False)
    load_checkpoint(ckpt, run.model, ctx)
    hf = to_hf(run.model, eos_token_id=run.tokenizer.eod if run.tokenizer else None)
    with written_dir(out) as tmp:
        hf.save_pretrained(str(tmp), safe_serialization=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-hf", type=Path, help="a local Hugging Face model folder")
    p.add_argument("--to", type=Path, help="the megatron-lite checkpoint folder to write")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--from", dest="src", type=Path, help="a megatron-lite checkpoint or run")
    p.add_argument("--to-hf", type=Path, help="the Hugging Face folder to write")
    a = p.parse_args(argv)
    if not ((a.from_hf and a.to) or (a.src and a.to_hf)):
        p.error("use --from-hf HF_DIR --to CKPT_DIR, or --from CKPT --to-hf HF_DIR")

    def body() -> None:
        out = from_hf_dir(a.from_hf, a.to, a.tp) if a.from_hf else to_hf_dir(a.src, a.to_hf)
        print(f"wrote {out}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
