"""MiniLM / MiniLMv2 distillation: the relations against a dense reference written here,
zero KL for a copy, TP=2 equal to TP=1, errors, and the command end to end."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.experiments.distill import attention_layers, distiller
from megatron_lite.experiments.distill import main as distill_main
from megatron_lite.experiments.relations import minilm_losses, minilmv2_losses
from megatron_lite.models import build_model
from megatron_lite.models.attention import captured
from megatron_lite.parallel import ParallelContext
from megatron_lite.train import main as train_main
from tests.training.conftest import gpt_yaml, tiny_overrides

TEACHER = {"model.num_layers": 3, "model.hidden_size": 64, "model.num_attention_heads": 4,
           "train.max_steps": 4, "train.eval_interval": 0}
STUDENT = {"model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
           "train.max_steps": 3, "train.eval_interval": 0, "model.hidden_dropout": 0.0,
           "model.attention_dropout": 0.0}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, gpt_shard, bpe_files):
    tmp = tmp_path_factory.mktemp("teacher")
    assert train_main([str(gpt_yaml(tmp)),
                       *tiny_overrides(gpt_shard, bpe_files, tmp / "run", **TEACHER)]) == 0
    return tmp / "run"


def _dense_kl(t_logits, s_logits, allowed):
    """KL(teacher || student) per query, with F.kl_div on masked logits: [b, H, s]."""
    t = t_logits.masked_fill(~allowed, float("-inf"))
    s = s_logits.masked_fill(~allowed, float("-inf"))
    kl = F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                  reduction="none")
    return torch.nan_to_num(kl).sum(-1)


def _captures(model, ids):
    with captured(attention_layers(model)) as seen:
        model(ids)
    return [one[0] for one in seen]


def _models(teacher_heads=4, student_heads=4):
    torch.manual_seed(0)
    t = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.seq_length=16",
                           f"model.num_attention_heads={teacher_heads}", "model.vocab_size=50",
                           "model.max_position_embeddings=16", "model.hidden_dropout=0",
                           "model.attention_dropout=0"]).model
    s = load_config(None, ["model.num_layers=1", "model.hidden_size=32", "model.seq_length=16",
                           f"model.num_attention_heads={student_heads}", "model.vocab_size=50",
                           "model.max_position_embeddings=16", "model.hidden_dropout=0",
                           "model.attention_dropout=0"]).model
    return build_model(t, ParallelContext()), build_model(s, ParallelContext())


def test_relations_equal_a_dense_reference():
    teacher, student = _models()
    ids = torch.randint(0, 50, (3, 16))
    t, s = _captures(teacher, ids)[-1], _captures(student, ids)[-1]
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    # MiniLM: per head, q k^T / sqrt(d_head) and v v^T / sqrt(d_head)
    ref = {}
    for name, (i, j) in (("attention", (0, 1)), ("value", (2, 2))):
        kl = _dense_kl(t[i] @ t[j].transpose(-1, -2) / 16 ** 0.5,
                       s[i] @ s[j].transpose(-1, -2) / 8 ** 0.5, causal)
        ref[name] = kl.mean()
    got = minilm_losses(t, s, 4, None)
    for name in ref:
        assert got[name].item() == pytest.approx(ref[name].item(), rel=1e-5)
    # MiniLMv2: the heads concatenated ([b, s, h], as the hidden size holds them), cut in 2
    got = minilmv2_losses(t, s, 2, 1, None)
    for name, i in (("query", 0), ("key", 1), ("value", 2)):
        tx = t[i].transpose(1, 2).reshape(3, 16, 64).view(3, 16, 2, 32).transpose(1, 2)
        sx = s[i].transpose(1, 2).reshape(3, 16, 32).view(3, 16, 2, 16).transpose(1, 2)
        kl = _dense_kl(tx @ tx.transpose(-1, -2) / 32 ** 0.5,
                       sx @ sx.transpose(-1, -2) / 16 ** 0.5, causal)
        assert got[name].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    # BERT-style padding: masked keys leave the softmax, padded queries the mean
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 10:] = 0
    bidir = (t[0], t[1], t[2], None, False)
    got = minilm_losses(bidir, (s[0], s[1], s[2], None, False), 4, None, mask)
    keys = mask.bool()[:, None, None, :].expand(3, 4, 16, 16)
    kl = _dense_kl(t[0] @ t[1].transpose(-1, -2) / 16 ** 0.5,
                   s[0] @ s[1].transpose(-1, -2) / 8 ** 0.5, keys)
    want = (kl * mask[:, None, :]).sum() / (4 * mask.sum())
    assert got["attention"].item() == pytest.approx(want.item(), rel=1e-5)


def test_a_copy_has_zero_kl_and_only_the_student_gets_gradients():
    teacher, _ = _models()
    student = build_model(teacher.cfg, ParallelContext())
    student.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        t = _captures(teacher, ids)[-1]
    s = _captures(student, ids)[-1]
    parts = {**minilm_losses(t, s, 4, None), **minilmv2_losses(t, s, 4, 1, None)}
    assert all(abs(v.item()) < 1e-7 for v in parts.values()), parts
    # a perturbed student: a positive loss whose gradient reaches the student only
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s = _captures(student, ids)[-1]
    loss = sum(minilmv2_losses(t, s, 4, 1, None).values())
    loss.backward()
    assert loss.item() > 1e-4
    assert all(p.grad is None for p in teacher.parameters())
    last = attention_layers(student)[-1].qkv.weight
    assert last.grad is not None and last.grad.abs().sum() > 0


def _distil(ctx, overrides, out):
    cfg = load_config(None, overrides)
    records = distiller(cfg, ctx).fit()
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(records))


@pytest.mark.parametrize("method", ["minilm", "minilmv2"])
def test_tp2_distillation_equals_tp1(distributed, teacher_run, gpt_shard, bpe_files, tmp_path,
                                     method):
    rows = {}
    for tp in (1, 2):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / f"tp{tp}", **STUDENT, **{
            "distill.teacher": str(teacher_run), "distill.method": method,
            "parallel.tensor_parallel_size": tp,
            "model.init_std": 0.2})  # sharp relations: KLs far from 0, compared relatively
        distributed(_distil, tp, over, str(tmp_path / f"{tp}.json"), tp_size=tp)
        rows[tp] = json.loads((tmp_path / f"{tp}.json").read_text())
    keys = ["kl_attention", "kl_value"] if method == "minilm" else \
        ["kl_query", "kl_key", "kl_value"]
    for a, b in zip(rows[1], rows[2], strict=True):
        for key in ["loss", "kl", "lm_loss", *keys]:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    assert rows[1][-1]["kl"] < rows[1][0]["kl"]  # it learns the relations


def test_mismatches_are_one_clear_error(teacher_run, gpt_shard, bpe_files, tmp_path, capsys):
    cases = [({"distill.method": "minilm", "model.num_attention_heads": 2},
              "the teacher has 4 heads, the student 2"),
             ({"distill.relation_heads": 3}, "distill.relation_heads=3 does not divide"),
             ({"distill.teacher_layer": 7}, "the teacher has 3 attention layers"),
             ({"model.activation_checkpointing": "full"}, "use none or selective"),
             ({"model.layerdrop": 0.5}, "would skip the layer whose relations are distilled"),
             ({"distill.teacher": None}, "distill.teacher is not set")]
    for extra, message in cases:
        kw = {**STUDENT, "distill.teacher": str(teacher_run), **extra}
        over = [o for o in tiny_overrides(gpt_shard, bpe_files, tmp_path / "x", **kw)
                if o != "distill.teacher=None"]
        assert distill_main([str(gpt_yaml(tmp_path)), *over]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_bert_teacher_and_student_with_an_assistant_end_to_end(sentence_shard, wordpiece_file,
                                                               tmp_path, capsys):
    """BERT as in the papers: a teacher, an assistant, a student; the student is an ordinary
    run (evaluated with its MLM/NSP metrics, exported to transformers)."""
    common = [f"data.data_path={sentence_shard}", "data.tokenizer_type=BertWordPieceLowerCase",
              f"data.vocab_file={wordpiece_file}", "model.seq_length=32",
              "model.max_position_embeddings=32", "model.make_vocab_size_divisible_by=8",
              "train.micro_batch_size=4", "train.global_batch_size=8", "train.log_interval=1",
              "train.eval_interval=0", "log.tensorboard=false", "model.layernorm_order=post"]
    config = tmp_path / "bert.yaml"
    config.write_text("model:\n  arch: bert\n")
    assert train_main([str(config), *common, "model.num_layers=3", "model.hidden_size=64",
                       "model.num_attention_heads=4", "train.max_steps=3",
                       f"train.run_dir={tmp_path / 'teacher'}"]) == 0
    assistant = tmp_path / "assistant.yaml"
    assistant.write_text("model:\n  arch: bert\n  num_layers: 2\n  hidden_size: 48\n"
                         "  num_attention_heads: 4\n")
    capsys.readouterr()
    student = [str(config), *common, "model.num_layers=1", "model.hidden_size=32",
               "model.num_attention_heads=4", "train.max_steps=2",
               f"train.run_dir={tmp_path / 'student'}", f"distill.teacher={tmp_path / 'teacher'}",
               f"distill.assistant={assistant}"]
    assert distill_main(student) == 0
    out = capsys.readouterr().out
    assert f"done: {tmp_path / 'student' / 'assistant'} at step 2" in out
    assert f"done: {tmp_path / 'student'} at step 2" in out
    rows = [json.loads(x) for x in (tmp_path / "student/metrics.jsonl").read_text().splitlines()]
    assert {"kl", "kl_query", "kl_key", "kl_value", "lm_loss", "mlm_accuracy"} <= set(rows[-1])
    saved = load_config(tmp_path / "student/config.yaml")
    assert saved.model.hidden_size == 32
    assert saved.distill.lm_weight == 0.0  # BERT: MiniLM's relations only, by default
    assert saved.distill.teacher == str(tmp_path / "student" / "assistant")
    # the same command again after the student's stage lost its checkpoints (killed before
    # its first save, say): the finished assistant is not trained again
    shutil.rmtree(tmp_path / "student" / "checkpoints")
    assert distill_main(student) == 0
    out = capsys.readouterr().out
    assert "assistant at step" not in out and f"done: {tmp_path / 'student'} at step 2" in out
    assert convert_main(["--from", str(tmp_path / "student"), "--to-hf",
                         str(tmp_path / "hf")]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.hidden_size == 32 and hf.config.num_hidden_layers == 1


def test_a_hugging_face_teacher_and_a_student_transformers_reads(teacher_run, gpt_shard,
                                                                 bpe_files, tmp_path):
    """The teacher as a Hugging Face folder (through the converter); the student's
    checkpoint converts to HF, and transformers reproduces its logits."""
    transformers = pytest.importorskip("transformers")
    assert convert_main(["--from", str(teacher_run), "--to-hf", str(tmp_path / "teacher")]) == 0
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "student", **{
        **STUDENT, "train.max_steps": 2, "distill.teacher": str(tmp_path / "teacher")})
    assert distill_main([str(gpt_yaml(tmp_path)), *over]) == 0
    assert convert_main(["--from", str(tmp_path / "student"), "--to-hf",
                         str(tmp_path / "hf")]) == 0
    cfg = load_config(tmp_path / "student/config.yaml")
    ours = build_model(cfg.model, ParallelContext())
    from megatron_lite.checkpoint import load_checkpoint

    load_checkpoint(tmp_path / "student", ours, ParallelContext())
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        want = ours.eval()(ids)[..., :cfg.model.vocab_size]
        assert (hf(ids).logits - want).abs().max() <= 1e-4


def test_a_gpt_student_trains_its_lm_head_by_default(teacher_run, gpt_shard, bpe_files,
                                                      tmp_path, capsys):
    """distill.lm_weight unset: 0.5 for a GPT student (its own LM loss beside the relations),
    recorded in config.yaml; the screen and metrics.jsonl give kl and lm_loss apart."""
    rows = {}
    for name, extra in (("default", {}), ("relations-only", {"distill.lm_weight": 0.0})):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / name, **{
            **STUDENT, **extra, "distill.teacher": str(teacher_run), "train.max_steps": 6,
            "optim.lr": 1e-2, "optim.warmup_steps": 0})
        assert distill_main([str(gpt_yaml(tmp_path)), *over]) == 0
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text()
                      .splitlines()]
    out = capsys.readouterr().out
    assert "loss = kl + 0.5 x lm_loss (distill.lm_weight)" in out
    line = next(x for x in out.splitlines() if x.startswith("step      4"))
    assert " | kl " in line and " | lm_loss " in line
    assert load_config(tmp_path / "default/config.yaml").distill.lm_weight == 0.5
    first, last = rows["default"][0], rows["default"][-1]
    assert first["loss"] == pytest.approx(first["kl"] + 0.5 * first["lm_loss"], rel=1e-6)
    zero = rows["relations-only"]
    assert zero[-1]["loss"] == pytest.approx(zero[-1]["kl"], rel=1e-6)
    assert first["lm_loss"] == zero[0]["lm_loss"]  # the same student before any update
    # its own loss trains it: lower than the relations alone leave it
    assert last["lm_loss"] < zero[-1]["lm_loss"] - 0.3
