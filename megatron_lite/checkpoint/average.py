"""Checkpoint averaging: the mean of several checkpoints' parameters, itself a checkpoint
(a cheap ensemble that often evaluates better than the last one alone)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_lite.checkpoint.format import CheckpointError, load_file, read_meta
from megatron_lite.files import written_dir


def average_checkpoints(paths: list[Path], out: Path) -> Path:
    """Average the model parameters of several checkpoints into a new one (no optimizer)."""
    if not paths:
        raise CheckpointError("nothing to average")
    total = None
    for p in paths:
        state = load_file(p / "model.pt")
        if total is None:
            total = {k: v.double().clone() for k, v in state.items()}
        else:
            if state.keys() != total.keys():
                raise CheckpointError(f"{p}/model.pt: parameters differ from {paths[0]}")
            for k, v in state.items():
                total[k] += v.double()
    averaged = {k: (v / len(paths)).to(state[k].dtype) for k, v in total.items()}  # last's
    meta = read_meta(paths[-1])
    meta.update(averaged_from=[str(p) for p in paths])
    with written_dir(out) as tmp:
        torch.save(averaged, tmp / "model.pt")
        shutil.copy(paths[-1] / "config.yaml", tmp / "config.yaml")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
