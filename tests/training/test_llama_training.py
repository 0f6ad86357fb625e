"""configs/llama/tiny-cpu.yaml trained end to end (shrunk): TP 2 equals TP 1 step by step,
the loss falls, a resume is bitwise exact, a checkpoint loads at another layout; and a
LlamaForCausalLM folder converted in, trained, evaluated and exported for transformers."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors

from megatron_lite.checkpoint import load_file
from megatron_lite.config import load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.examples.tiny_llama import write_tiny_llama
from megatron_lite.parallel import ParallelContext, full_state_dict
from megatron_lite.tasks import windows
from megatron_lite.training.trainer import Trainer
from preprocessing.__main__ import main as preprocess_main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama" / "tiny-cpu.yaml"


def llama_overrides(shard, bpe_files, run_dir, **kw) -> list[str]:
    """The shipped config at test size (its parts kept: rope, RMSNorm, SwiGLU, 2 K/V
    groups, no biases, untied output layer), on the test corpus."""
    vocab, merges = bpe_files
    base = {"model.num_layers": 2, "model.hidden_size": 64, "model.ffn_hidden_size": 96,
            "model.seq_length": 32, "model.max_position_embeddings": 32,
            "model.make_vocab_size_divisible_by": 8, "optim.warmup_steps": 2,
            "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.max_steps": 10,
            "train.log_interval": 1, "train.eval_interval": 5, "train.eval_iters": 2,
            "train.save_interval": 0, "train.run_dir": str(run_dir), "log.tensorboard": False,
            "data.data_path": str(shard), "data.vocab_file": str(vocab),
            "data.merge_file": str(merges)}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _train(ctx, overrides):
    Trainer(load_config(CONFIG, overrides), ctx).fit()


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_llama_tp2_equals_tp1_resumes_exactly_and_learns(distributed, gpt_shard,
                                                              bpe_files, tmp_path):
    """The shipped config's parts at TP 2 (its 2 K/V heads split over the ranks): equal
    to TP 1 step by step; a run stopped at step 5 and resumed equals the straight run
    bitwise; its checkpoint loads at TP 1; and the loss falls."""
    def over(name, tp):
        return llama_overrides(gpt_shard, bpe_files, tmp_path / name,
                               **{"parallel.tensor_parallel_size": tp})

    _train(ParallelContext(), over("tp1", 1))
    distributed(_train, 2, over("tp2", 2))
    distributed(_train, 2, over("split", 2) + ["train.exit_after=5"])
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_00000005"
    distributed(_train, 2, over("split", 2))  # resumes from the run dir by itself
    ref, got, split = (_rows(tmp_path / n) for n in ("tp1", "tp2", "split"))
    assert [r["step"] for r in got] == [r["step"] for r in split] == list(range(1, 11))
    rel = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(got, ref, strict=True))
    print(f"llama tiny: losses {ref[0]['loss']:.3f} -> {ref[-1]['loss']:.3f}; TP=2 vs TP=1 "
          f"max relative difference {rel:.2e}")
    assert rel <= 1e-5
    val = [(a.get("val_loss"), b.get("val_loss")) for a, b in zip(got, ref, strict=True)]
    assert all(a is None and b is None or abs(a - b) <= 1e-5 * b for a, b in val)
    for ra, rb in zip(got, split, strict=True):
        assert ra["loss"] == rb["loss"] and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
        assert ra["grad_norm"] == rb["grad_norm"]
    first, last = (sum(r["loss"] for r in rows) / 3 for rows in (ref[:3], ref[-3:]))
    assert last < first - 0.1, (first, last)  # it learns the corpus
    ckpt = tmp_path / "split/checkpoints/step_00000005"
    _check_loads_at_tp1(ckpt, over("load1", 1) + [f"train.load={ckpt}"])


def _hf_window_loss(hf, tokens, seq, overlap):
    """Brute force: every window of the task through transformers' model."""
    total, count = 0.0, 0
    for start, first in windows(len(tokens) - 1, seq, overlap):
        chunk = torch.tensor(tokens[start:start + seq + 1])
        with torch.no_grad():
            logits = hf(chunk[None, :-1]).logits[0]
        losses = F.cross_entropy(logits, chunk[1:], reduction="none")[first:]
        total, count = total + float(losses.sum()), count + len(losses)
    return total / count, count


def _check_loads_at_tp1(ckpt: Path, overrides: list[str]) -> None:
    trainer = Trainer(load_config(CONFIG, overrides), ParallelContext())
    state = full_state_dict(trainer.model)
    for name, t in load_file(ckpt / "model.pt").items():  # the full form, assembled
        ours = state[name][: t.shape[0]] if name in ("wte.weight", "output_layer.weight") \
            else state[name]
        assert torch.equal(ours, t), name


def test_convert_a_llama_folder_in_train_and_export_for_transformers(corpus_file, tmp_path,
                                                                     capsys):
    """The README's path: a LlamaForCausalLM folder with its tokenizer.json converts in
    (recorded for TP 2; trained here at TP 1, any TP loads it), continues training on its
    tokenizer's shards, and converts out to a folder
    transformers loads alone (AutoTokenizer, pipeline) with our logits; an untrained
    checkpoint converts back to the original weights exactly."""
    transformers = pytest.importorskip("transformers")


    hf_dir = write_tiny_llama(corpus_file, tmp_path / "hf", vocab_size=500, hidden=32,
                              layers=2, heads=4, kv_heads=2, ffn=48, max_positions=64)
    assert convert_main(["--from-hf", str(hf_dir), "--to", str(tmp_path / "in"),
                         "--tp", "2"]) == 0
    cfg = load_config(tmp_path / "in/config.yaml")
    assert cfg.data.tokenizer_type == "HFTokenizer" and cfg.model.num_query_groups == 2
    tok = build_tokenizer("HFTokenizer", tokenizer_model=cfg.data.tokenizer_model)
    assert tok.eod == tok.backend.token_to_id("<|end_of_text|>")
    # untrained, straight back out: the original weights exactly
    assert convert_main(["--from", str(tmp_path / "in"), "--to-hf", str(tmp_path / "out0")]) == 0
    original = load_safetensors(str(hf_dir / "model.safetensors"))
    back = load_safetensors(str(tmp_path / "out0/model.safetensors"))
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)

    assert preprocess_main(["--input", str(corpus_file), "--output-prefix",
                            str(tmp_path / "shard"), "--tokenizer-type", "HFTokenizer",
                            "--tokenizer-model", str(hf_dir), "--append-eod", "--quiet",
                            "--workers", "1"]) == 0
    over = [f"data.data_path={tmp_path / 'shard_text_document'}",
            f"train.load={tmp_path / 'in'}", "train.finetune=true",
            "parallel.tensor_parallel_size=1",
            f"train.run_dir={tmp_path / 'run'}", "model.seq_length=32", "train.max_steps=3",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0",
            "log.tensorboard=false", "optim.lr=1e-3"]
    trainer = Trainer(load_config(tmp_path / "in/config.yaml", over), ParallelContext())
    trainer.fit()
    assert convert_main(["--from", str(tmp_path / "run"), "--to-hf", str(tmp_path / "out")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    text = "Return the number of items in the container."
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text)
    with torch.no_grad():
        ours = trainer.model.eval()(torch.tensor([ids]))[..., : tok.vocab_size]
        assert (hf(torch.tensor([ids])).logits - ours).abs().max() <= 1e-4
    # zero-shot WikiText: the same loss as transformers over the same windows
    text = json.loads(corpus_file.read_text().splitlines()[-1])["text"][:2000]
    (tmp_path / "wiki.txt").write_text(text)
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "run"), "--task", "wikitext", "--input",
                          str(tmp_path / "wiki.txt"), "--overlap", "8"]) == 0
    ours = json.loads(capsys.readouterr().out.splitlines()[-1])
    want, count = _hf_window_loss(hf, tok.encode(text), 32, 8)
    assert ours["targets"] == count and ours["loss"] == pytest.approx(want, rel=1e-4)
    (tmp_path / "lambada.jsonl").write_text(json.dumps({"text": text[:300]}) + "\n")
    assert evaluate_main([str(tmp_path / "run"), "--task", "lambada", "--input",
                          str(tmp_path / "lambada.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["passages"] == 1
    generator = transformers.pipeline("text-generation", model=str(tmp_path / "out"))
    out = generator("Return the", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("Return the") and len(out) > len("Return the")
