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
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from megatron_lite.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    resolve_checkpoint,
)
from megatron_lite.cli import run_cli
from megatron_lite.config import Config, ConfigError, load_config, save_config
from megatron_lite.data.tokenizer import GPT2_EOD, TokenizerError
from megatron_lite.files import written_dir
from megatron_lite.models.hf import (
    config_from_hf,
    hf_to_full_state,
    hf_weight_files,
    load_hf_model,
    read_hf_config,
    to_hf,
)
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.pipeline import unpipelined
from megatron_lite.resolve import check_fits, tokenizer_from_config
from megatron_lite.run import build_run

# what --from-hf holds per parameter at its peak: the HF model's fp32 weights and the
# converted copy being saved
FROM_HF_BYTES_PER_PARAM = 8


def from_hf_dir(hf_dir: Path, out: Path, tp: int = 1) -> Path:
    """Write a megatron-lite checkpoint folder holding an HF model's weights.

    Checked before anything is allocated or written: ``config.json`` (a model this machine
    can hold: the planner's parameter count against host memory), the weights (safetensors
    only, complete), ``tokenizer.json`` (parses as a tokenizer)."""
    hf_config = read_hf_config(hf_dir)
    cfg = Config()
    cfg.model = config_from_hf(hf_config)
    try:
        cfg.validate()  # sizes >= 1, heads dividing the width... (one line)
        check_fits(cfg, ParallelContext(), FROM_HF_BYTES_PER_PARAM)  # one process, TP=1
    except ConfigError as err:
        raise ConfigError(f"{Path(hf_dir) / 'config.json'}: {err}") from None
    hf_weight_files(hf_dir)
    _check_tokenizer_json(hf_dir)
    hf = load_hf_model(hf_dir, hf_config)
    cfg.parallel.tensor_parallel_size = tp
    state = hf_to_full_state(hf.state_dict(), cfg.model)
    meta = {"format_version": FORMAT_VERSION, "step": 0, "consumed_samples": 0,
            "tokens_seen": 0, "tp_size": tp, "dp_size": 1, "world_size": tp,
            "converted_from": str(hf_dir)}
    out = Path(os.path.abspath(out))
    files = _hf_tokenizer_files(hf_dir, cfg, Path(os.path.abspath(hf_dir)))
    if files:  # checked before anything is written
        tok = tokenizer_from_config(cfg)
        if tok.vocab_size > cfg.model.vocab_size:
            raise TokenizerError(f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens, more "
                                 f"than the model's vocab_size {cfg.model.vocab_size}")
        cfg.model.vocab_size = tok.vocab_size  # rows past it are the model's padding
        _hf_tokenizer_files(hf_dir, cfg, out / "tokenizer")  # the copies travel with it
    with written_dir(out) as tmp:
        torch.save(state, tmp / "model.pt")
        if files:
            (tmp / "tokenizer").mkdir()
            for f in files:
                shutil.copyfile(f, tmp / "tokenizer" / f.name)
        save_config(cfg, tmp / "config.yaml")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _check_tokenizer_json(hf_dir: Path) -> None:
    """A ``tokenizer.json`` that --from-hf would copy must load as a tokenizer."""
    path = Path(hf_dir) / "tokenizer.json"
    if path.is_file():
        try:
            Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises plain Exceptions
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TokenizerError(f"{path}: not a tokenizer the tokenizers library reads "
                                 f"({first[:200]})") from None


def _hf_tokenizer_files(hf_dir: Path, cfg: Config, dest: Path) -> list[Path]:
    """The tokenizer files of an HF folder, and ``cfg.data`` naming them in ``dest`` (the
    folder itself, or where they are copied): GPT-2 BPE, WordPiece, or any
    ``tokenizer.json`` (``HFTokenizer``); [] when it has none."""
    d = cfg.data
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "vocab.txt")
    files = [hf_dir / n for n in names if (hf_dir / n).is_file()]
    have = {f.name for f in files}
    if cfg.model.arch == "gpt" and {"vocab.json", "merges.txt"} <= have and \
            GPT2_EOD in json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8")):
        d.tokenizer_type = "GPT2BPETokenizer"
        d.vocab_file, d.merge_file = str(dest / "vocab.json"), str(dest / "merges.txt")
    elif cfg.model.arch == "bert" and "vocab.txt" in have:
        lower = True
        if "tokenizer_config.json" in have:
            conf = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
            lower = conf.get("do_lower_case", True)
        d.tokenizer_type = "BertWordPieceLowerCase" if lower else "BertWordPieceCase"
        d.vocab_file = str(dest / "vocab.txt")
    elif "tokenizer.json" in have:
        d.tokenizer_type, d.tokenizer_model = "HFTokenizer", str(dest)
    else:
        return []
    return files


def to_hf_dir(ckpt: Path, out: Path) -> Path:
    """Write a folder ``transformers`` loads on its own: ``config.json``,
    ``model.safetensors``, the run's tokenizer (:func:`write_hf_tokenizer`) and, for GPT,
    ``generation_config.json``.

    The special ids (GPT-2's ``bos``/``eos``, BERT's ``[PAD]``) come from the run's
    tokenizer; when its files cannot be read, a warning says so and the export holds no
    tokenizer. A tokenizer that does not fit the checkpoint's vocabulary is an error
    before anything is written.
    """
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_config(ckpt / "config.yaml")
    cfg.parallel.tensor_parallel_size = 1  # one process builds the full model
    unpipelined(cfg)  # a pipelined run's checkpoint loads at PP=1
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    try:
        tokenizer_from_config(cfg)
    except TokenizerError as err:
        print(f"warning: {err}: the export holds no tokenizer and names no special tokens",
              file=sys.stderr)
        cfg.data.tokenizer_type = None
    ctx = ParallelContext()
    run = build_run(cfg, ctx, data=False)  # a tokenizer of another size: ConfigError
    load_checkpoint(ckpt, run.model, ctx)
    tok = run.tokenizer
    hf = to_hf(run.model, eos_token_id=tok.eod if tok and cfg.model.arch == "gpt" else None,
               pad_token_id=tok.specials.get("[PAD]") if tok else None)
    with written_dir(out) as tmp:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        if tok is not None:
            write_hf_tokenizer(tok, cfg, tmp)
    return out


def write_hf_tokenizer(tok, cfg: Config, out: Path) -> None:
    """The run's tokenizer as ``transformers`` reads it: GPT-2 BPE as ``vocab.json`` +
    ``merges.txt`` + ``tokenizer.json``; WordPiece as ``vocab.txt`` + ``tokenizer.json``;
    SentencePiece as ``tokenizer.model``; with ``tokenizer_config.json`` and
    ``special_tokens_map.json`` naming its real special tokens (GPT: also
    ``generation_config.json``)."""
    d = cfg.data
    max_len = cfg.model.max_position_embeddings
    if tok.kind == "GPT2BPETokenizer":
        shutil.copyfile(d.vocab_file, out / "vocab.json")
        shutil.copyfile(d.merge_file, out / "merges.txt")
        tok.backend.save(str(out / "tokenizer.json"))
        eod = GPT2_EOD
        specials = {"bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": eod}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
    elif tok.kind.startswith("BertWordPiece"):
        shutil.copyfile(d.vocab_file, out / "vocab.txt")
        tok.backend.save(str(out / "tokenizer.json"))
        specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                    "cls_token": "[CLS]", "mask_token": "[MASK]"}
        config = {"tokenizer_class": "BertTokenizer",
                  "do_lower_case": tok.kind == "BertWordPieceLowerCase"}
    elif tok.kind == "SentencePieceTokenizer":
        shutil.copyfile(d.tokenizer_model, out / "tokenizer.model")
        sp = tok.backend
        specials = {name: sp.id_to_piece(i) for name, i in (
            ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
            ("pad_token", sp.pad_id())) if i >= 0}
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                  "add_eos_token": False}
    else:  # HFTokenizer: its own tokenizer.json and config travel as they are
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(d.tokenizer_model) / name).is_file():
                shutil.copyfile(Path(d.tokenizer_model) / name, out / name)
        specials, config = {}, None
    if config is not None:
        config = {**config, **specials, "model_max_length": max_len}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    if cfg.model.arch == "gpt" and tok.eod is not None:
        gen = {"bos_token_id": tok.eod, "eos_token_id": tok.eod, "pad_token_id": tok.eod}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-hf", type=Path, help="a local Hugging Face model folder")
    p.add_argument("--to", type=Path, help="the megatron-lite checkpoint folder to write")
    p.add_argument("--tp", type=int, default=1,
                   help="with --from-hf: the parallel.tensor_parallel_size the checkpoint's "
                        "config.yaml records (default 1); its weights load at any TP size")
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
