"""Zero-shot tasks (WikiText perplexity, LAMBADA) against transformers on the converted
model, and exports that work with transformers alone (its pipelines, offline)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.checkpoint import load_checkpoint
from megatron_lite.config import load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.generate import main as generate_main
from megatron_lite.parallel import ParallelContext
from megatron_lite.run import build_run
from megatron_lite.tasks import lambada, wikitext, windows
from megatron_lite.train import main as train_main
from preprocessing.__main__ import main as preprocess_main
from tests.training.conftest import gpt_yaml, tiny_overrides

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, gpt_shard, bpe_files):
    tmp = tmp_path_factory.mktemp("gptrun")
    over = tiny_overrides(gpt_shard, bpe_files, tmp / "run",
                          **{"train.max_steps": 6, "train.eval_interval": 0})
    assert train_main([str(gpt_yaml(tmp)), *over]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def gpt_hf(tmp_path_factory, gpt_run):
    out = tmp_path_factory.mktemp("gpthf") / "hf"
    assert convert_main(["--from", str(gpt_run), "--to-hf", str(out)]) == 0
    return out


def _load(run_dir, tp=1, ctx=None):
    cfg = load_config(Path(run_dir) / "config.yaml")
    cfg.parallel.tensor_parallel_size = tp
    ctx = ctx or ParallelContext()
    run = build_run(cfg, ctx, data=False)
    load_checkpoint(run_dir, run.model, ctx)
    return run


def test_windows_score_every_target_once():
    for targets, seq, overlap in [(100, 32, 16), (100, 32, 0), (32, 32, 8), (5, 32, 8),
                                  (1000, 64, 63)]:
        plan = windows(targets, seq, overlap)
        scored = [t for start, first in plan
                  for t in range(start + first, min(start + seq, targets))]
        assert scored == list(range(targets))
        stride = seq - overlap
        assert len(plan) == 1 + math.ceil(max(targets - seq, 0) / stride)


def _hf_window_loss(hf, tokens, seq, overlap):
    """Brute force, written here: every window through transformers' model."""
    total, count = 0.0, 0
    for start, first in windows(len(tokens) - 1, seq, overlap):
        chunk = torch.tensor(tokens[start:start + seq + 1])
        with torch.no_grad():
            logits = hf(chunk[None, :-1]).logits[0]
        losses = F.cross_entropy(logits, chunk[1:], reduction="none")[first:]
        total += float(losses.sum())
        count += len(losses)
    return total / count, count


def _wikitext_tp(ctx, run_dir, text_file, out):
    run = _load(run_dir, tp=ctx.tp_size, ctx=ctx)
    result = wikitext(run, text_file, overlap=8, progress=False)
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(result))


def test_wikitext_perplexity_equals_transformers_on_the_same_windows(
        gpt_run, gpt_hf, stdlib_docs, tmp_path, capsys, distributed):
    text = "\n\n".join(stdlib_docs[200:203])
    path = tmp_path / "wiki.txt"
    path.write_text(text)
    capsys.readouterr()
    assert evaluate_main([str(gpt_run), "--task", "wikitext", "--input", str(path),
                          "--overlap", "24"]) == 0
    ours = json.loads(capsys.readouterr().out.splitlines()[-1])
    tok = _load(gpt_run).tokenizer
    tokens = tok.encode(text)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(gpt_hf)).eval()
    want, count = _hf_window_loss(hf, tokens, 32, 24)
    assert ours["targets"] == count == len(tokens) - 1
    assert ours["loss"] == pytest.approx(want, rel=1e-4)
    words = len(text.strip().split(" "))  # Megatron's count
    assert ours["words"] == words
    assert ours["word_perplexity"] == pytest.approx(
        math.exp(want * (len(tokens) - 1) / (words - 1)), rel=1e-3)
    assert ours["forwards"] == 1 + math.ceil((len(tokens) - 1 - 32) / 8)
    # less overlap, fewer forwards, a (slightly) different number
    assert evaluate_main([str(gpt_run), "--task", "wikitext", "--input", str(path),
                          "--overlap", "0"]) == 0
    flat = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert flat["forwards"] == math.ceil((len(tokens) - 1) / 32)
    assert flat["loss"] == pytest.approx(_hf_window_loss(hf, tokens, 32, 0)[0], rel=1e-4)
    # TP=2 gives the TP=1 number
    distributed(_wikitext_tp, 2, gpt_run, str(path), str(tmp_path / "tp2.json"), tp_size=2)
    tp2 = json.loads((tmp_path / "tp2.json").read_text())
    one = wikitext(_load(gpt_run), path, overlap=8, progress=False)
    assert tp2["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_task_input_errors_are_one_line(gpt_run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert evaluate_main([str(gpt_run), "--task", "wikitext", "--input", str(empty)]) == 2
    assert "empty.txt: empty file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"text\": \"one\"}\n{\"other\": 1}\n")
    assert evaluate_main([str(gpt_run), "--task", "lambada", "--input", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no usable passage (1 not_json, 1 no_text, 1 too_short)" in err and "\n" not in err


def _passages(stdlib_docs, n=20):
    out = []
    for doc in stdlib_docs:
        words = doc.split()
        if len(words) >= 14 and all(w.isascii() for w in words[:12]):
            out.append(" ".join(words[:12]))
        if len(out) == n:
            return out
    raise AssertionError("not enough passages")


def test_lambada_memorised_passages_score_one_and_match_transformers(
        stdlib_docs, bpe_files, tmp_path, capsys):
    passages = _passages(stdlib_docs)
    corpus = tmp_path / "lambada.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    prefix = tmp_path / "mem"
    assert preprocess_main(["--input", str(corpus), "--output-prefix", str(prefix),
                            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                            str(bpe_files[0]), "--merge-file", str(bpe_files[1]),
                            "--append-eod", "--min-tokens", "1", "--no-dedup", "--quiet",
                            "--workers", "1"]) == 0
    runs = {}
    for name, steps in (("random", 1), ("memorised", 300)):
        over = tiny_overrides(f"{prefix}_text_document", bpe_files, tmp_path / name, **{
            "train.max_steps": steps, "train.eval_interval": 0, "model.hidden_size": 64,
            "optim.lr": 3e-3 if steps > 1 else 0.0, "optim.min_lr": 1e-3 if steps > 1 else 0.0,
            "optim.warmup_steps": 10, "data.split": "1,0,0", "train.log_interval": 100})
        assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
        runs[name] = lambada(_load(tmp_path / name), corpus, progress=False)
    assert runs["memorised"]["accuracy"] == 1.0, runs["memorised"]
    assert runs["random"]["accuracy"] <= 0.1
    # the same greedy predictions through transformers, last word against all its tokens
    assert convert_main(["--from", str(tmp_path / "memorised"), "--to-hf",
                         str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    tok = build_tokenizer("GPT2BPETokenizer", *map(str, bpe_files))
    got = []
    for p in passages:
        cut = p.rfind(" ")
        context, target = tok.encode(p[:cut]), tok.encode(p[cut:])
        context = context[-(32 - len(target) + 1):]  # the window: the end of the passage
        with torch.no_grad():
            logits = hf(torch.tensor([context + target[:-1]])).logits[0]
        got.append(int(logits[len(context) - 1:].argmax(-1).tolist() == target))
    assert got == runs["memorised"]["predictions"]
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "memorised"), "--task", "lambada", "--input",
                          str(corpus)]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["accuracy"] == 1.0 and out["passages"] == 20 and "predictions" not in out


CHECK = r"""
import json, sys
import numpy as np, torch, transformers
from transformers import pipeline
kind, folder, ids_file = sys.argv[1:4]
expected = np.load(ids_file)
tok = transformers.AutoTokenizer.from_pretrained(folder)
out = {}
if kind == "gpt":
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok("Return the value of the")["input_ids"]
    assert ids == expected["ids"].tolist(), (ids, expected["ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    out["max_dev"] = float(np.abs(logits - expected["logits"]).max())
    gen = pipeline("text-generation", model=folder)("Return the", max_new_tokens=8,
                                                    do_sample=False)
    out["text"] = gen[0]["generated_text"]
else:
    filled = pipeline("fill-mask", model=folder)(f"return the {tok.mask_token} of the list")
    out["candidates"] = [c["token_str"] for c in filled]
    out["mask_id"] = tok.mask_token_id
    out["ids"] = tok("return the value")["input_ids"]
assert "megatron_lite" not in sys.modules
print(json.dumps(out))
"""


def _transformers_alone(kind, folder, expected, tmp_path):
    np.savez(tmp_path / "expected.npz", **expected)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CHECK, kind, str(folder),
                          str(tmp_path / "expected.npz")], env={**env, **OFFLINE},
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gpt_export_runs_in_transformers_alone(gpt_run, gpt_hf, tmp_path):
    names = {p.name for p in gpt_hf.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json"} <= names
    run = _load(gpt_run)
    ids = run.tokenizer.encode("Return the value of the")
    with torch.no_grad():
        logits = run.model.eval()(torch.tensor([ids]))[0, :, :run.cfg.model.vocab_size]
    out = _transformers_alone("gpt", gpt_hf, {"ids": np.array(ids),
                                              "logits": logits.numpy()}, tmp_path)
    assert out["max_dev"] <= 1e-4
    assert out["text"].startswith("Return the") and len(out["text"]) > len("Return the")
    eod = run.tokenizer.eod
    gen = json.loads((gpt_hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == eod
    assert json.loads((gpt_hf / "special_tokens_map.json").read_text())["eos_token"] == \
        "<|endoftext|>"


def test_bert_export_fills_masks_in_transformers_alone(sentence_shard, wordpiece_file,
                                                       tmp_path):
    over = [f"data.data_path={sentence_shard}", "data.tokenizer_type=BertWordPieceLowerCase",
            f"data.vocab_file={wordpiece_file}", "model.arch=bert", "model.num_layers=2",
            "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32",
            "model.max_position_embeddings=32", "model.make_vocab_size_divisible_by=8",
            "model.layernorm_order=post", "train.micro_batch_size=4",
            "train.global_batch_size=4", "train.max_steps=3", "train.eval_interval=0",
            f"train.run_dir={tmp_path / 'bert'}", "log.tensorboard=false"]
    config = tmp_path / "b.yaml"
    config.write_text("model:\n  arch: bert\n")
    assert train_main([str(config), *over]) == 0
    assert convert_main(["--from", str(tmp_path / "bert"), "--to-hf", str(tmp_path / "hf")]) == 0
    tok = build_tokenizer("BertWordPieceLowerCase", str(wordpiece_file))
    out = _transformers_alone("bert", tmp_path / "hf", {"x": np.zeros(1)}, tmp_path)
    assert len(out["candidates"]) == 5 and out["mask_id"] == tok.specials["[MASK]"]
    # [CLS] return the value [SEP], the ids of our WordPiece
    assert out["ids"] == [tok.specials["[CLS]"], *tok.encode("return the value"),
                          tok.specials["[SEP]"]]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == \
        tok.specials["[PAD]"]


def test_from_hf_brings_the_tokenizer_and_hftokenizer_preprocesses_alike(
        gpt_hf, corpus_file, bpe_files, tmp_path, capsys):
    back = tmp_path / "back"
    assert convert_main(["--from-hf", str(gpt_hf), "--to", str(back)]) == 0
    cfg = load_config(back / "config.yaml")
    assert cfg.data.tokenizer_type == "GPT2BPETokenizer"
    assert cfg.data.vocab_file == str(back / "tokenizer" / "vocab.json")
    assert (back / "tokenizer" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert generate_main([str(back), "--prompt", "Return the", "--greedy",
                          "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Return the")
    # any tokenizer.json through HF tokenizers: the same shard as the GPT-2 BPE files give
    shards = {}
    for name, args in (("bpe", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                                str(bpe_files[0]), "--merge-file", str(bpe_files[1])]),
                       ("hf", ["--tokenizer-type", "HFTokenizer", "--tokenizer-model",
                               str(gpt_hf)])):
        prefix = tmp_path / name
        assert preprocess_main(["--input", str(corpus_file), "--output-prefix", str(prefix),
                                *args, "--append-eod", "--quiet", "--workers", "1"]) == 0
        shards[name] = (Path(f"{prefix}_text_document.bin").read_bytes(),
                        Path(f"{prefix}_text_document.idx").read_bytes())
    assert shards["hf"] == shards["bpe"]


def test_a_tokenizer_that_does_not_fit_the_checkpoint_is_an_error(gpt_run, corpus_file,
                                                                  tmp_path, capsys):
    from preprocessing.train_tokenizer import train

    other = tmp_path / "other"
    train([str(corpus_file)], "bpe", 1000, other)
    run = tmp_path / "run"
    shutil.copytree(gpt_run, run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    text = (ckpt / "config.yaml").read_text()
    vocab = load_config(ckpt / "config.yaml").data
    (ckpt / "config.yaml").write_text(text.replace(vocab.vocab_file, str(other / "vocab.json"))
                                      .replace(vocab.merge_file, str(other / "merges.txt")))
    capsys.readouterr()
    assert convert_main(["--from", str(run), "--to-hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.vocab_size=2000 but the tokenizer" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()
