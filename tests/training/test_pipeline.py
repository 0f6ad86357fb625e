"""Pipeline parallelism (torch.distributed.pipelining) against one process: the same
losses and gradient norms step by step, the tied embedding's two copies, bitwise resume,
checkpoints across PP sizes, and the one-line refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lite.config import ConfigError, load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.generate import main as generate_main
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.pipeline import chunk_layers
from megatron_lite.parallel.state import _grid
from megatron_lite.plan import apply_overrides, plan, suggest
from megatron_lite.resolve import check_config
from megatron_lite.train import main as train_main
from megatron_lite.training.pipeline import build_pipeline_model
from megatron_lite.training.trainer import Trainer
from tests.distributed import gather_shards
from tests.training.conftest import gpt_yaml, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# 4 micro-batches of 2 per step and DP rank: 1F1B at P=2 has a steady state
PP = {"model.num_layers": 4, "train.max_steps": STEPS, "train.global_batch_size": 8,
      "train.eval_interval": STEPS, "train.eval_iters": 1, "optim.warmup_steps": 1}


def _train(ctx, overrides):
    """Train; then the first and the last stage compare their copies of the tied
    embedding, which must be bitwise equal."""
    trainer = Trainer(load_config(None, overrides), ctx)
    trainer.fit()
    if ctx.embedding_group is not None:
        first, last = gather_shards(trainer.model.wte.weight, ctx.embedding_group)
        assert torch.equal(first, last), "the tied embedding's copies differ"
        assert not torch.equal(first, trainer.model.wte.weight.new_zeros(first.shape))


def _load_and_evaluate(ctx, overrides, expected):
    """A PP=2 run that starts from a one-process checkpoint: its validation loss before
    any step is the checkpoint's."""
    trainer = Trainer(load_config(None, overrides), ctx)
    got = trainer.evaluate()["val_loss"]
    assert abs(got - expected) <= 1e-5 * abs(expected), (got, expected)
    trainer.lock.release()


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def one_process(gpt_shard, bpe_files, tmp_path_factory):
    """The reference: the same model and data in one process (its run folder)."""
    run = tmp_path_factory.mktemp("pp_ref") / "run"
    assert train_main([str(gpt_yaml(run.parent)),
                       *tiny_overrides(gpt_shard, bpe_files, run, **PP)]) == 0
    return run


def _compare(got, ref, what):
    for key in ("loss", "grad_norm"):
        rel = _rel([r[key] for r in got], [r[key] for r in ref])
        print(f"{what}: max relative {key} difference vs one process over {STEPS} steps "
              f"{rel:.2e}")
        assert rel <= 1e-5, f"{what}: {key} deviates by {rel:.2e}"
    val = [r["val_loss"] for r in got if "val_loss" in r]
    ref_val = [r["val_loss"] for r in ref if "val_loss" in r]
    assert len(val) == 1 and _rel(val, ref_val) <= 1e-5


LAYOUTS = [
    pytest.param(2, 1, 2, {}, id="pp2"),
    pytest.param(4, 2, 2, {}, id="tp2xpp2", marks=pytest.mark.slow),
    pytest.param(4, 1, 2, {}, id="pp2xdp2", marks=pytest.mark.slow),
    pytest.param(2, 1, 2, {"parallel.pipeline_schedule": "gpipe"}, id="gpipe",
                 marks=pytest.mark.slow),
    pytest.param(2, 1, 2, {"parallel.pipeline_schedule": "interleaved_1f1b",
                           "parallel.virtual_pipeline_size": 2}, id="interleaved_v2"),
    pytest.param(2, 1, 2, {"parallel.pipeline_layers": "1,3",
                           "model.activation_checkpointing": "full"}, id="uneven_recompute",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("world,tp,pp,extra", LAYOUTS)
def test_pipeline_equals_one_process(distributed, gpt_shard, bpe_files, tmp_path, one_process,
                                     capsys, world, tp, pp, extra):
    """Each layout (and each schedule: GPipe and interleaved 1F1B then equal 1F1B too)
    trains the same losses and gradient norms as one process; at PP=2 its checkpoint
    evaluates at PP=1 to its validation loss."""
    run = tmp_path / "run"
    over = tiny_overrides(gpt_shard, bpe_files, run, **PP, **{
        "parallel.tensor_parallel_size": tp, "parallel.pipeline_parallel_size": pp, **extra})
    distributed(_train, world, over, tp_size=tp, pp_size=pp)
    got = _records(run)
    _compare(got, _records(one_process), f"TP={tp} x DP={world // tp // pp} x PP={pp} {extra}")
    if world == 2 and not extra:  # the PP=2 checkpoint in one process (PP=1, TP=1)
        capsys.readouterr()
        assert evaluate_main([str(run), "--iters", "1"]) == 0
        loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
        assert abs(loss - got[-1]["val_loss"]) <= 1e-5 * got[-1]["val_loss"]
        # generate and convert read it as any checkpoint: its Hugging Face export holds
        # the one-process run's tensors (equal to 1e-5 after 4 equal steps)
        assert generate_main([str(run), "--prompt", "The", "--max-new-tokens", "4",
                              "--greedy"]) == 0
        exports = {}
        for name, src in (("pp", run), ("ref", one_process)):
            assert convert_main(["--from", str(src), "--to-hf", str(tmp_path / name)]) == 0
            exports[name] = {k: v for f in sorted((tmp_path / name).glob("*.safetensors"))
                             for k, v in load_file(f).items()}
        assert exports["pp"].keys() == exports["ref"].keys() and exports["pp"]
        for k, v in exports["ref"].items():
            torch.testing.assert_close(exports["pp"][k], v, rtol=1e-4, atol=1e-5)


def test_one_process_checkpoint_loads_at_pp2(distributed, gpt_shard, bpe_files, tmp_path,
                                             one_process):
    expected = [r["val_loss"] for r in _records(one_process) if "val_loss" in r][-1]
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        **PP, "parallel.pipeline_parallel_size": 2, "train.max_steps": STEPS + 1,
        "train.load": str(one_process)})
    distributed(_load_and_evaluate, 2, over, expected, tp_size=1, pp_size=2)


def test_bitwise_resume_at_pp2(distributed, gpt_shard, bpe_files, tmp_path):
    """With dropout on: 4 steps at once equal 2 steps, an exit, and a resume, bit for bit."""
    drop = {**PP, "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
            "parallel.pipeline_parallel_size": 2, "train.eval_interval": 0}
    for name, extra in (("straight", {}), ("resumed", {"train.exit_after": 2})):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / name, **drop, **extra)
        distributed(_train, 2, over, tp_size=1, pp_size=2)
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "resumed", **drop)
    distributed(_train, 2, over, tp_size=1, pp_size=2)
    straight = [(r["loss"], r["grad_norm"]) for r in _records(tmp_path / "straight")]
    resumed = [(r["loss"], r["grad_norm"]) for r in _records(tmp_path / "resumed")]
    assert len(straight) == STEPS and resumed == straight


def _cfg(**kw):
    over = {"model.num_layers": 4, "model.hidden_size": 32, "model.num_attention_heads": 4,
            "model.vocab_size": 64, "train.micro_batch_size": 2, "train.global_batch_size": 8,
            "parallel.pipeline_parallel_size": 2, **kw}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("kw,message", [
    ({"model.num_layers": 3}, "model.num_layers=3 is not divisible by 2 pipeline chunks "
     "(parallel.pipeline_parallel_size=2): set parallel.pipeline_layers"),
    ({"parallel.pipeline_layers": "1,2"}, "parallel.pipeline_layers=1,2 must be 2 counts"),
    ({"train.global_batch_size": 2}, "1 micro-batches per step (train.global_batch_size=2 / "
     "(micro_batch_size=2 x DP=1)) are fewer than parallel.pipeline_parallel_size=2 stages"),
    ({"model.position_embedding": "relative", "model.mem_len": 8},
     "model.position_embedding=relative refuses parallel.pipeline_parallel_size=2"),
    ({"model.adaptive_span": True, "model.position_embedding": "relative",
      "model.attn_span": 8}, "model.attention_core=adaptive_span refuses"),
    ({"model.layerdrop": 0.2}, "LayerDrop (model.layerdrop, model.layers_to_keep)"),
    ({"model.arch": "bert"}, "pipelining is for model.arch=gpt (not bert)"),
    ({"parallel.engine": "deepspeed"}, "needs parallel.engine=ddp"),
    ({"parallel.virtual_pipeline_size": 2}, "needs parallel.pipeline_schedule=interleaved_1f1b"),
])
def test_pipeline_refusals(kw, message):
    with pytest.raises(ConfigError, match="^.*" + message.replace("(", r"\(").replace(
            ")", r"\)").replace(".", r"\.")):
        check_config(_cfg(**kw), world_size=2)
    check_config(_cfg(), world_size=2)  # the same layout without the bad key is fine


def test_pipeline_error_is_one_line_through_the_cli(gpt_shard, bpe_files, tmp_path, capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                          **{"parallel.pipeline_parallel_size": 2})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "parallel.pipeline_parallel_size=2" in err, err


def test_chunk_layers_split():
    assert chunk_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert chunk_layers(6, 3, [1, 2, 3]) == [range(0, 1), range(1, 3), range(3, 6)]


def test_planner_stage_parameters_equal_the_built_stages():
    """The planner's largest stage against the stages really built (meta device)."""
    cfg = _cfg(**{"model.num_layers": 6, "parallel.pipeline_layers": "2,4",
                  "model.vocab_size": 500, "model.hidden_size": 64})
    with torch.device("meta"):
        planned = plan(cfg, 1, 1, "h100", pp=2)["params_per_rank"]
        one = plan(cfg, 1, 1, "h100", pp=1)["params_per_rank"]
    built = []
    for rank in (0, 1):
        ctx = ParallelContext(pp_size=2, pp_rank=rank, pp_ranks=(0, 1))
        stage = build_pipeline_model(cfg, cfg.model, ctx, device="meta")
        built.append(sum(p.numel() for p in stage.parameters()))
    # the largest stage: the last (4 layers, the head's copy of the embedding, the final
    # norm); the planner counts every non-layer parameter there (+ the position table)
    print(f"stage parameters {built}, planned largest {planned}, one process {one}")
    assert max(built) <= planned <= max(built) + 64 * cfg.model.max_position_embeddings
    assert planned < one


def test_planner_suggests_pipeline_stages_when_tp_in_a_node_does_not_fit():
    cfg = load_config(ROOT / "configs/gpt2/8.3b.yaml")
    with torch.device("meta"):
        assert not plan(cfg, 8, 1, "16GiB")["fits"]
        fix = suggest(cfg, 8, 1, "16GiB")
        assert fix["pp"] > 1 and f"parallel.pipeline_parallel_size={fix['pp']}" in \
            fix["overrides"]
        fixed = plan(apply_overrides(cfg, fix["overrides"]), fix["tp"], 1, "16GiB",
                     pp=fix["pp"])
        assert fixed["fits"] and fixed["pipeline_bubble"] == pytest.approx(
            (fix["pp"] - 1) / (fixed["config"]["accumulation"] + fix["pp"] - 1))


def test_grid_is_tp_then_dp_then_pp():
    """Megatron's order, written out by hand for world 8 = TP 2 x DP 2 x PP 2."""
    tp, dp, pp = _grid(8, 2, 2)
    assert tp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert _grid(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0], [1], [2], [3]])


def test_a_stage_holds_its_layers_drawn_as_one_process_draws_them():
    """Each stage's parameters are real and bitwise the one-process model's under the
    same names; nothing else of the model is held."""
    cfg = _cfg(**{"model.num_layers": 4, "parallel.pipeline_layers": "1,3"})
    ctx = ParallelContext()
    ctx.seed(7)
    whole = dict(build_model(cfg.model, ctx).named_parameters())
    seen = set()
    for rank in (0, 1):
        stage_ctx = ParallelContext(pp_size=2, pp_rank=rank, pp_ranks=(0, 1))
        stage_ctx.seed(7)
        stage = build_pipeline_model(cfg, cfg.model, stage_ctx)
        names = dict(stage.named_parameters())
        layers = {n.split(".")[2] for n in names if n.startswith("transformer.layers.")}
        assert layers == ({"0", "1"} if rank == 0 else {"2", "3", "4", "5", "6", "7"})
        for name, p in names.items():
            assert p.device.type == "cpu" and torch.equal(p, whole[name]), name
        seen |= set(names)
    assert seen == set(whole)
