"""Pipeline parallelism (torch.distributed.pipelining) against one process: the same
losses and gradient norms step by step, the tied embedding's two copies, bitwise resume,
checkpoints across PP sizes, and the one-line refusals."""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lite import resolve
from megatron_lite.config import ConfigError, load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.generate import main as generate_main
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.pipeline import chunk_layers
from megatron_lite.parallel.state import _grid
from megatron_lite.plan import apply_overrides, plan, suggest
from megatron_lite.resolve import check_config, check_fits
from megatron_lite.train import main as train_main
from megatron_lite.training.pipeline import build_pipeline_model
from megatron_lite.training.trainer import Trainer
from tests.distributed import gather_shards
from tests.training.conftest import gpt_yaml, tiny_overrides
from tests.training.interrupts import interrupt_rerun_and_reference

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# 4 micro-batches of 2 per step and DP rank: 1F1B at P=2 has a steady state
PP = {"model.num_layers": 4, "train.max_steps": STEPS, "train.global_batch_size": 8,
      "train.eval_interval": STEPS, "train.eval_iters": 1, "optim.warmup_steps": 1}


def _train(ctx, overrides):
    """Train; then the first and the last stage compare their copies of the tied
    embedding, which must be bitwise equal."""
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, ctx)
    sent = set()  # what each chunk but the last passes on: [b, s, h] or, with sequence
    # parallelism, this TP rank's [b, s/tp, h]
    senders = [c for c in trainer.model.chunks if not c.last]
    for chunk in senders:
        chunk.register_forward_hook(lambda m, i, out: sent.add(tuple(out.shape[1:])))
    trainer.fit()
    split = ctx.tp_size if cfg.parallel.sequence_parallel else 1
    shape = (cfg.model.seq_length // split, cfg.model.hidden_size)
    assert sent == ({shape} if senders else set()), sent
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
    # the stages pass each TP rank's sequence shard (~11 s: kept in the fast suite)
    pytest.param(4, 2, 2, {"parallel.sequence_parallel": True}, id="tp2xpp2_sp"),
    pytest.param(4, 2, 2, {"parallel.sequence_parallel": True,
                           "parallel.pipeline_schedule": "interleaved_1f1b",
                           "parallel.virtual_pipeline_size": 2,
                           "model.activation_checkpointing": "full"},
                 id="tp2xpp2_sp_interleaved_recompute", marks=pytest.mark.slow),
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


# the distributed optimizer: the last stage's tied copy loads from the first's name too
@pytest.mark.parametrize("distopt", [pytest.param(False, id="ddp"),
                                     pytest.param(True, id="distopt")])
def test_one_process_checkpoint_loads_at_pp2(distributed, gpt_shard, bpe_files, tmp_path,
                                             one_process, distopt):
    expected = [r["val_loss"] for r in _records(one_process) if "val_loss" in r][-1]
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        **PP, "parallel.pipeline_parallel_size": 2, "train.max_steps": STEPS + 1,
        "train.load": str(one_process), "parallel.distributed_optimizer": distopt})
    distributed(_load_and_evaluate, 2, over, expected, tp_size=1, pp_size=2)


@pytest.mark.parametrize("world,tp,extra", [
    pytest.param(2, 1, {}, id="pp2"),
    # the distributed optimizer's slices of each stage (masters and moments) resume too
    pytest.param(4, 1, {"parallel.distributed_optimizer": True}, id="pp2xdp2_distopt"),
    # each TP rank's own dropout masks on its sequence shard (the TP-region stream)
    pytest.param(4, 2, {"parallel.sequence_parallel": True}, id="tp2xpp2_sp",
                 marks=pytest.mark.slow),
])
def test_bitwise_resume_at_pp2(distributed, gpt_shard, bpe_files, tmp_path, world, tp, extra):
    """With dropout on: 4 steps at once equal 2 steps, an exit, and a resume, bit for bit."""
    drop = {**PP, "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
            "parallel.pipeline_parallel_size": 2, "train.eval_interval": 0,
            "parallel.tensor_parallel_size": tp, **extra}
    for name, more in (("straight", {}), ("resumed", {"train.exit_after": 2})):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / name, **drop, **more)
        distributed(_train, world, over, tp_size=tp, pp_size=2)
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "resumed", **drop)
    distributed(_train, world, over, tp_size=tp, pp_size=2)
    straight = [(r["loss"], r["grad_norm"]) for r in _records(tmp_path / "straight")]
    resumed = [(r["loss"], r["grad_norm"]) for r in _records(tmp_path / "resumed")]
    assert len(straight) == STEPS and resumed == straight


def _load_and_evaluate_ddp(ctx, overrides, expected):
    """A DDP run at PP=1 that resumes a pipelined distributed-optimizer checkpoint
    (weights, masters and Adam moments): its validation loss before any step is the
    checkpoint's, and its optimizer holds every parameter's moments."""
    trainer = Trainer(load_config(None, overrides), ctx)
    assert trainer.distopt is None and trainer.pipeline is None
    got = trainer.evaluate()["val_loss"]
    assert abs(got - expected) <= 1e-5 * abs(expected), (got, expected)
    state = trainer.optimizer.state
    assert all(torch.count_nonzero(state[p]["exp_avg_sq"]) > 0 for p in trainer.params)
    trainer.lock.release()


def test_distributed_optimizer_pipelined_equals_one_process_and_ddp(
        distributed, gpt_shard, bpe_files, tmp_path, one_process, capsys):
    """PP=2 x DP=2 with the distributed optimizer (each stage's own buffers, slices and
    reduce-scatters; the tied embedding's gradient summed over the two stages before
    them) trains the losses and gradient norms of one process and of the DDP engine at
    the same layout; its tied copies stay bitwise equal (``_train``); its checkpoint
    evaluates in one process (PP=1) to its validation loss and resumes into DDP at
    PP=1 x DP=2 (weights, masters and moments under their global names)."""
    runs = {}
    for name, distopt in (("distopt", True), ("ddp", False)):
        runs[name] = tmp_path / name
        over = tiny_overrides(gpt_shard, bpe_files, runs[name], **PP, **{
            "parallel.pipeline_parallel_size": 2, "parallel.distributed_optimizer": distopt})
        distributed(_train, 4, over, tp_size=1, pp_size=2)
    got, ddp = _records(runs["distopt"]), _records(runs["ddp"])
    _compare(got, _records(one_process), "PP=2 x DP=2, distributed optimizer")
    for key in ("loss", "grad_norm"):
        rel = _rel([r[key] for r in got], [r[key] for r in ddp])
        print(f"PP=2 x DP=2: distributed optimizer vs DDP, max relative {key} difference "
              f"{rel:.2e}")
        assert rel <= 1e-5, f"{key} deviates from DDP by {rel:.2e}"
    val = got[-1]["val_loss"]
    capsys.readouterr()
    assert evaluate_main([str(runs["distopt"]), "--iters", "1"]) == 0
    loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert abs(loss - val) <= 1e-5 * val, (loss, val)
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "into_ddp", **{
        **PP, "train.max_steps": STEPS + 1, "train.load": str(runs["distopt"])})
    distributed(_load_and_evaluate_ddp, 2, over, val, tp_size=1, pp_size=1)


def test_distributed_optimizer_pipelined_at_pp2_equals_one_process(
        distributed, gpt_shard, bpe_files, tmp_path, one_process):
    """The fast suite's check: PP=2 with the distributed optimizer (DP=1: each stage's
    buffer, the tied gradient summed in it, the norm counting the tied copy once)
    equals one process; the tied copies stay bitwise equal (``_train``)."""
    run = tmp_path / "run"
    over = tiny_overrides(gpt_shard, bpe_files, run, **PP, **{
        "parallel.pipeline_parallel_size": 2, "parallel.distributed_optimizer": True})
    distributed(_train, 2, over, tp_size=1, pp_size=2)
    _compare(_records(run), _records(one_process), "PP=2, distributed optimizer")


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


def test_fit_check_counts_the_largest_stage(monkeypatch):
    """A model whose training state fits a rank only split into two stages is accepted at
    PP=2 and refused in one process (the check counts the stage, not the model); the
    budget is set from the stages really built (meta device)."""
    cfg = _cfg(**{"model.num_layers": 8, "model.hidden_size": 256})
    built = max(sum(p.numel() for p in build_pipeline_model(
        cfg, cfg.model, ParallelContext(pp_size=2, pp_rank=r, pp_ranks=(0, 1)),
        device="meta").parameters()) for r in (0, 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(resolve, "host_memory", lambda: int(1.1 * 16 * built))
    check_fits(cfg, ParallelContext(world_size=2, pp_size=2), 16)
    one = _cfg(**{"model.num_layers": 8, "model.hidden_size": 256,
                  "parallel.pipeline_parallel_size": 1})
    with pytest.raises(ConfigError, match=r"of state per rank at TP=1 \(16 B/param\)"):
        check_fits(one, ParallelContext(), 16)
    monkeypatch.setattr(resolve, "host_memory", lambda: int(0.9 * 16 * built))
    with pytest.raises(ConfigError, match=r"at TP=1 x PP=2 \(its largest stage\)"):
        check_fits(cfg, ParallelContext(world_size=2, pp_size=2), 16)


def test_planner_p2p_bytes_divide_by_tp_under_sequence_parallelism():
    """Each micro-batch's [b, s, h] forward and gradient per boundary, fp32 (bf16 weights:
    2 bytes), and with sequence parallelism each TP rank's [b, s/tp, h] shard."""
    base = {"model.seq_length": 32, "model.max_position_embeddings": 32}
    with torch.device("meta"):
        whole = plan(_cfg(**base), 2, 1, "h100", pp=2)["p2p_bytes_per_step"]
        sp = plan(_cfg(**base, **{"parallel.sequence_parallel": True}), 2, 1, "h100",
                  pp=2)["p2p_bytes_per_step"]
        bf16 = plan(_cfg(**base, **{"train.precision": "bf16", "train.params_dtype": "bf16"}),
                    2, 1, "h100", pp=2)["p2p_bytes_per_step"]
    assert whole == 2 * 4 * 2 * 32 * 32 * 4  # fwd + bwd, 4 micro-batches of [2, 32, 32]
    assert sp == whole // 2 and bf16 == whole // 2


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


@pytest.mark.parametrize("world,distopt", [
    pytest.param(2, False, id="mainparams"), pytest.param(2, True, id="distopt"),
    # PP=2 x DP=2: bf16 weights all-gathered from each stage's fp32 master slices
    pytest.param(4, True, id="distopt_dp2")])
def test_bf16_params_pipelined_follow_the_unpipelined_bf16_run(distributed, gpt_shard,
                                                               bpe_files, tmp_path, world,
                                                               distopt):
    """train.params_dtype=bf16 (bf16 weights and activations, fp32 main grads and
    masters) at PP=2 follows the same run in one process within bf16 rounding; the tied
    embedding's copies stay equal (their fp32 main grads are summed over the two stages:
    MainParams', or the distributed optimizer's gradient buffer)."""
    bf16 = {**PP, "train.precision": "bf16", "train.params_dtype": "bf16",
            "optim.lr": 1e-2}
    assert train_main([str(gpt_yaml(tmp_path)), *tiny_overrides(
        gpt_shard, bpe_files, tmp_path / "ref", **bf16)]) == 0
    distributed(_train, world, tiny_overrides(gpt_shard, bpe_files, tmp_path / "pp", **{
        **bf16, "parallel.pipeline_parallel_size": 2,
        "parallel.distributed_optimizer": distopt}), tp_size=1, pp_size=2)
    got, ref = _records(tmp_path / "pp"), _records(tmp_path / "ref")
    for key in ("loss", "grad_norm"):
        rel = _rel([r[key] for r in got], [r[key] for r in ref])
        print(f"bf16 params PP=2: max relative {key} difference vs one process {rel:.2e}")
        assert rel <= 4e-3, f"{key} deviates by {rel:.2e}"  # bf16: 2^-8 = 3.9e-3
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1  # it learns: the steps were taken
    val = [r["val_loss"] for r in got if "val_loss" in r]
    assert len(val) == 1 and _rel(val, [r["val_loss"] for r in ref if "val_loss" in r]) <= 4e-3


@pytest.mark.slow  # three torchrun jobs of 2 processes
def test_sigterm_at_pp2_saves_and_the_rerun_resumes_bitwise(gpt_shard, bpe_files, tmp_path):
    """SIGTERM (as a batch system sends it, to torchrun and both stages at once) during a
    PP=2 run with dropout: both stages finish the step, one checkpoint, one line; the
    rerun resumes and reproduces the uninterrupted run's losses and gradient norms bit
    for bit. The stages are frozen (SIGSTOP) before the signal, so it lands mid-run
    however fast the machine trains."""
    steps = 30
    run = tmp_path / "run"
    args = [str(gpt_yaml(tmp_path)), *tiny_overrides(
        gpt_shard, bpe_files, run, **{"parallel.pipeline_parallel_size": 2,
                                      "model.num_layers": 4, "train.max_steps": steps,
                                      "train.eval_interval": 0, "train.global_batch_size": 4,
                                      "model.hidden_dropout": 0.1,
                                      "model.attention_dropout": 0.1})]
    interrupt_rerun_and_reference(args, run, tmp_path / "reference", signal.SIGTERM, steps)
    got, want = _records(run), _records(tmp_path / "reference")
    assert [(r["loss"], r["grad_norm"]) for r in got] == \
        [(r["loss"], r["grad_norm"]) for r in want]
