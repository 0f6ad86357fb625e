"""LayerDrop in training at TP 1 and 2, and depth on demand: prune, then use the result."""

import json

import numpy as np
import pytest
import torch

from megatron_lite.checkpoint import load_checkpoint
from megatron_lite.config import load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.generate import main as generate_main
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext
from megatron_lite.prune import main as prune_main
from megatron_lite.train import main as train_main
from megatron_lite.training.trainer import Trainer
from tests.distributed import gather_full, max_dev
from tests.training.conftest import gpt_yaml, tiny_overrides


def _train(ctx, overrides):
    Trainer(load_config(None, overrides), ctx).fit()


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_layerdrop_losses_are_the_same_at_tp1_and_tp2(distributed, gpt_shard, bpe_files,
                                                      tmp_path):
    """Every TP rank takes the same decisions (else the collectives would not match)."""
    for tp in (1, 2):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / f"tp{tp}", **{
            "parallel.tensor_parallel_size": tp, "model.num_layers": 4,
            "model.layerdrop": 0.5, "train.eval_interval": 0})
        distributed(_train, tp, over, tp_size=tp)
    ref, got = _losses(tmp_path / "tp1"), _losses(tmp_path / "tp2")
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
    print(f"LayerDrop p=0.5: max relative loss difference TP=2 vs TP=1, 10 steps {rel:.2e}")
    assert len(ref) == 10 and rel <= 1e-5


@pytest.fixture(scope="module")
def four_layer_run(tmp_path_factory, gpt_shard, bpe_files):
    tmp = tmp_path_factory.mktemp("prune")
    over = tiny_overrides(gpt_shard, bpe_files, tmp / "run", **{
        "model.num_layers": 4, "model.layerdrop": 0.3, "train.max_steps": 4,
        "train.eval_interval": 0})
    assert train_main([str(gpt_yaml(tmp)), *over]) == 0
    return tmp / "run"


def test_prune_then_evaluate_equals_layers_to_keep(four_layer_run, tmp_path, capsys):
    out = tmp_path / "half"
    assert prune_main(["--from", str(four_layer_run), "--to", str(out),
                       "--keep", "every-other"]) == 0
    assert "2 layers" in capsys.readouterr().out
    cfg = load_config(out / "config.yaml")
    assert cfg.model.num_layers == 2 and cfg.model.layers_to_keep == ""
    assert json.loads((out / "meta.json").read_text())["kept_layers"] == [0, 2]
    assert (out / "optim.pt").exists()  # Adam's moments of the kept layers came along
    results = []
    for argv in ([str(out)], [str(four_layer_run), "model.layers_to_keep=0,2"]):
        assert evaluate_main([*argv, "--iters", "2"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    full = [str(four_layer_run), "--iters", "2"]
    assert evaluate_main(full) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] != \
        results[0]["loss"]


def _check_pruned_logits(ctx, run, pruned):
    """The pruned checkpoint against the full one with layers 1 and 3 kept at run time."""
    full = load_config(run / "config.yaml", ["model.layers_to_keep=1,3"]).model
    ids = torch.arange(40).view(2, 20) % 500
    outs = []
    for cfg, path in ((full, run), (load_config(pruned / "config.yaml").model, pruned)):
        ctx.seed(0)
        model = build_model(cfg, ctx).eval()
        load_checkpoint(path, model, ctx)
        with torch.no_grad():
            outs.append(gather_full(model(ids), ctx.tp_group, -1)[..., :cfg.vocab_size])
    assert max_dev(*outs) <= 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_pruned_checkpoint_logits_at_tp(distributed, four_layer_run, tmp_path, tp):
    assert prune_main(["--from", str(four_layer_run), "--to", str(tmp_path / "p"),
                       "--keep", "1,3"]) == 0
    distributed(_check_pruned_logits, tp, four_layer_run, tmp_path / "p")


def test_pruned_checkpoint_trains_further(four_layer_run, tmp_path, gpt_shard, bpe_files):
    assert prune_main(["--from", str(four_layer_run), "--to", str(tmp_path / "p"),
                       "--keep", "0,3"]) == 0
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "again", **{
        "model.num_layers": 2, "train.max_steps": 6, "train.eval_interval": 0,
        "train.load": str(tmp_path / "p")})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    assert len(_losses(tmp_path / "again")) == 2  # steps 5 and 6 after the loaded step 4
    assert np.isfinite(_losses(tmp_path / "again")).all()


@pytest.mark.parametrize("keep,message", [
    ("0,4", "layer 4 out of range (the model has layers 0..3)"),
    ("1,1", "names a layer twice"),
    (",", "keeps no layer"),
    ("0,1,2,3", "keeps every layer"),
    ("odd", "expected every-other or layer indices"),
])
def test_prune_bad_input_is_one_line(four_layer_run, tmp_path, capsys, keep, message):
    assert prune_main(["--from", str(four_layer_run), "--to", str(tmp_path / "x"),
                       "--keep", keep]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_prune_keeps_a_sandwich_pattern(gpt_shard, bpe_files, tmp_path, capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        "model.num_layers": 4, "model.sandwich_coefficient": 2, "train.max_steps": 2,
        "train.eval_interval": 0})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    assert "sssfsfff" in capsys.readouterr().out  # printed at start
    assert load_config(tmp_path / "run/config.yaml").model.sublayer_pattern == "sssfsfff"
    assert generate_main([str(tmp_path / "run"), "--prompt", "Return the", "--greedy",
                          "--max-new-tokens", "4"]) == 0  # rebuilt from config.yaml
    assert convert_main(["--from", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 2
    assert "'sssfsfff' is not (sf)^4" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert prune_main(["--from", str(tmp_path / "run"), "--to", str(tmp_path / "p"),
                       "--keep", "0,3"]) == 0
    assert load_config(tmp_path / "p/config.yaml").model.pattern == "ssff"
    model = build_model(load_config(tmp_path / "p/config.yaml").model)
    load_checkpoint(tmp_path / "p", model, ParallelContext())
