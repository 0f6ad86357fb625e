"""Depth on demand: write a checkpoint of some of a model's layers (Fan et al. 2019).

    python -m megatron_lite.prune --from runs/x --to runs/x-half --keep every-other
    python -m megatron_lite.prune --from CKPT --to OUT --keep 0,3,5,7

A *layer* is a pair of consecutive sublayers (an attention and a feed-forward sublayer
in an ordinary stack; see ``megatron_lite.config.layer_units``). ``every-other`` is the
paper's rule at pruning rate 1/2 (drop the layers at depth d = 0 mod 2, counting depth
from 1): it keeps layers 0, 2, 4, ... (0-based), as fairseq's
``--decoder-layers-to-keep 0,2,4,...``. The kept layers are renumbered 0..k-1 and the
config updated; the result is an ordinary checkpoint that evaluate, generate, convert
and further training (``train.load``) accept at any TP size. Adam's moments of the kept
layers come along when the source has them.

To try a pruning without writing anything: ``evaluate RUN model.layers_to_keep=0,2,4``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from megatron_lite.checkpoint import (
    CheckpointError,
    has_optimizer_state,
    load_file,
    read_meta,
    resolve_checkpoint,
)
from megatron_lite.cli import parse_args, run_cli
from megatron_lite.config import Config, ConfigError, layer_units, load_config, save_config
from megatron_lite.files import written_dir
from megatron_lite.parallel import ParallelContext, load_full_state_dict
from megatron_lite.run import build_run

_SUBLAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


def parse_keep(spec: str, num_layers: int) -> list[int]:
    """``every-other`` or ``0,2,4``: the kept layers, sorted; one clear error otherwise."""
    if spec == "every-other":
        keep = list(range(0, num_layers, 2))
    else:
        try:
            keep = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--keep {spec!r}: expected every-other or layer indices like "
                              "0,2,4") from None
    if not keep:
        raise ConfigError(f"--keep {spec!r} keeps no layer")
    if bad := [i for i in keep if not 0 <= i < num_layers]:
        raise ConfigError(f"--keep {spec!r}: layer {bad[0]} out of range (the model has "
                          f"layers 0..{num_layers - 1})")
    if len(set(keep)) != len(keep):
        raise ConfigError(f"--keep {spec!r} names a layer twice")
    if keep == list(range(num_layers)):
        raise ConfigError(f"--keep {spec!r} keeps every layer: nothing to prune")
    return sorted(keep)


def pruned_config(cfg: Config, keep: list[int]) -> tuple[Config, list[int]]:
    """The config of the kept layers and, for each new sublayer, its old index."""
    m = cfg.model
    units = layer_units(m.pattern)
    old = [i for j in keep for i in range(*units[j])]
    pattern = "".join(m.pattern[i] for i in old)
    ordinary = pattern == "sf" * len(keep)
    model = dataclasses.replace(
        m, num_layers=len(keep), sublayer_pattern="" if ordinary else pattern,
        sandwich_coefficient=0, par_ratio=0.0, layers_to_keep="")
    return dataclasses.replace(cfg, model=model), old


def _rename(state: dict, old: list[int]) -> dict:
    """Keep the entries of the kept sublayers, renumbered; everything else as it was."""
    new_index = {o: n for n, o in enumerate(old)}
    out = {}
    for name, value in state.items():
        m = _SUBLAYER.match(name)
        if m is None:
            out[name] = value
        elif int(m.group(1)) in new_index:
            out[f"transformer.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    return out


def prune_checkpoint(src: str | Path, out: str | Path, keep_spec: str) -> tuple[Path, Config]:
    """Write the pruned checkpoint of ``src`` (a checkpoint or run folder) to ``out``."""
    ckpt = resolve_checkpoint(src)
    cfg = load_config(ckpt / "config.yaml")
    if cfg.model.kept_layers is not None:
        raise ConfigError(f"{ckpt}/config.yaml already sets model.layers_to_keep")
    keep = parse_keep(keep_spec, len(layer_units(cfg.model.pattern)))
    new_cfg, old = pruned_config(cfg, keep)
    model_state = _rename(load_file(ckpt / "model.pt"), old)
    optim = load_file(ckpt / "optim.pt") if has_optimizer_state(ckpt) else None
    if optim is not None:
        optim["state"] = _rename(optim["state"], old)
    # build the pruned model (one process) and load the result: it must fit exactly
    check = dataclasses.replace(new_cfg, parallel=dataclasses.replace(
        new_cfg.parallel, tensor_parallel_size=1, engine="ddp", zero_stage=1))
    check.train = dataclasses.replace(check.train,
                                      global_batch_size=check.train.micro_batch_size)
    run = build_run(check, ParallelContext(), data=False)
    try:
        load_full_state_dict(run.model, model_state)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{ckpt}/model.pt: does not fit its config.yaml ({err})") from None
    meta = dict(read_meta(ckpt), pruned_from=str(ckpt), kept_layers=keep)
    with written_dir(out) as tmp:
        torch.save(model_state, tmp / "model.pt")
        if optim is not None:
            torch.save(optim, tmp / "optim.pt")
        save_config(new_cfg, tmp / "config.yaml")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out), new_cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="a checkpoint or run folder")
    p.add_argument("--to", dest="out", required=True, type=Path, help="the folder to write")
    p.add_argument("--keep", required=True, help="every-other, or layer indices: 0,2,4")
    a = parse_args(p, argv)

    def body() -> None:
        out, cfg = prune_checkpoint(a.src, a.out, a.keep)
        print(f"wrote {out}: {cfg.model.num_layers} layers "
              f"({cfg.model.pattern}), kept {a.keep}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
