"""The config tree: YAML + dotted overrides, with one clear error per bad key or value."""

import pytest

from megatron_lite.config import Config, ConfigError, load_config, save_config
from megatron_lite.resolve import check_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 2\n  hidden_size: 64\noptim:\n  lr: 1e-4\n"
                    "data:\n  split: 98,1,1\n")
    cfg = load_config(path, ["train.max_steps=7", "model.ffn_hidden_size=256",
                             "data.data_path=/x/y_text_document", "optim.min_lr=0"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.min_lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.ffn_hidden_size == 256
    assert cfg.data.split == "98,1,1" and cfg.data.data_path == "/x/y_text_document"
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize("text,override,message", [
    ("model:\n  num_layer: 2\n", None, "run.yaml: unknown key model.num_layer"),
    ("modle:\n  num_layers: 2\n", None, "run.yaml: unknown section 'modle'"),
    ("model:\n  num_layers: two\n", None, "run.yaml: model.num_layers: expected int, got 'two'"),
    ("model:\n  a: 1\n\tb: 2\n", None, "run.yaml: line 3 invalid YAML"),
    ("", "train.max_steps", "expected section.key=value"),
    ("", "train.max_steps=1.5", "override 'train.max_steps=1.5': train.max_steps: expected int"),
    ("", "optim.lr=fast", "optim.lr: expected float"),
    ("", "model.num_layers=true", "expected int, got True"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, text, override, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override] if override else [])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config("nope.yaml")


def test_validate_choices_and_layout():
    cfg = load_config(None, ["model.arch=t5", "train.precision=fp8"])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert "model.arch='t5' is not one of gpt, bert" in str(err.value)
    assert "train.precision='fp8'" in str(err.value)

    cfg = load_config(None, ["parallel.tensor_parallel_size=2", "model.num_attention_heads=3",
                             "model.hidden_size=96", "train.precision=fp8"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg, world_size=2)
    # one error naming the layout problem and the config's own
    assert "num_attention_heads=3 is not divisible" in str(err.value)
    assert "train.precision='fp8'" in str(err.value) and "\n" not in str(err.value)
    Config().validate()
    check_config(Config(), world_size=1)


def test_config_does_not_import_the_parallel_core():
    import subprocess
    import sys

    code = ("import sys, megatron_lite.config; "
            "print(any(m.startswith('megatron_lite.parallel') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number"),
    ("model.num_layers=0", "model.num_layers=0 must be >= 1"),
    ("model.seq_length=0", "model.seq_length=0 must be >= 1"),
    ("model.hidden_size=-8", "model.hidden_size=-8 must be >= 1"),
    ("model.attention_dropout=1.0", "model.attention_dropout=1.0 must be in [0, 1)"),
    ("train.eval_iters=-1", "train.eval_iters=-1 must be >= 0"),
])
def test_values_that_cannot_work_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, [override]))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "sublayer_pattern" not in str(err.value)  # num_layers=0 is said once


def test_parameter_estimate_equals_the_built_models_count():
    from megatron_lite.memory import estimate_parameters
    from megatron_lite.plan import count_parameters

    for name in ("gpt2/124m", "bert/base", "gpt2/tiny-cpu"):
        for tp in (1, 8):
            cfg = load_config(f"configs/{name}.yaml")
            assert estimate_parameters(cfg.model, tp) == count_parameters(cfg, tp)["total"]


def test_a_model_too_large_for_the_machine_is_refused_before_it_is_built():
    from megatron_lite.parallel import ParallelContext
    from megatron_lite.run import build_run

    cfg = load_config(None, ["model.num_layers=10000000", "model.vocab_size=1000"])
    with pytest.raises(ConfigError, match=r"about .*B parameters: .* GiB of state per rank "
                                          r"at TP=1 \(16 B/param\), more than"):
        build_run(cfg, ParallelContext(), data=True)  # would take minutes to allocate


def test_removed_test_only_keys_are_ignored_at_their_defaults_else_named(tmp_path):
    """train.inject_nan_* and train.fail_* (test-only fault injection, now hooks): every
    config.yaml written before holds them at their defaults, which still load."""
    old = tmp_path / "config.yaml"
    old.write_text("train:\n  max_steps: 7\n  inject_nan_at_step: 0\n  inject_nan_times: 1\n"
                   "  fail_at_step: 0\n  fail_rank: 0\n")
    cfg = load_config(old)
    assert cfg.train.max_steps == 7 and not hasattr(cfg.train, "fail_at_step")
    with pytest.raises(ConfigError) as err:
        load_config(old, ["train.fail_at_step=5"])
    assert "train.fail_at_step is no longer a config key" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_override_that_is_not_yaml_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.run_dir=[oops"])
    assert str(err.value).startswith("override 'train.run_dir=[oops': not a YAML value")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,dp", [
    ([], 1), ([], 4), (["train.precision=bf16", "train.params_dtype=bf16"], 2),
    (["parallel.engine=deepspeed", "parallel.zero_stage=1", "train.precision=bf16"], 8),
    (["parallel.engine=deepspeed", "parallel.zero_stage=2"], 4),
    (["parallel.distributed_optimizer=true"], 4),
    (["parallel.distributed_optimizer=true", "train.precision=bf16",
      "train.params_dtype=bf16"], 8),
])
def test_the_fit_check_counts_the_planners_training_state(overrides, dp):
    """The fit check refuses only what cannot hold its state (weights, gradients, masters,
    optimizer; no activations): the planner's figures for the same layout, so a ZeRO
    layout that fits is never refused."""
    import torch

    from megatron_lite.plan import plan
    from megatron_lite.resolve import state_bytes_per_param

    cfg = load_config("configs/gpt2/124m.yaml", overrides)
    with torch.device("meta"):
        out = plan(cfg, 1, dp, "h100")
    mem = out["memory_per_rank"]
    state = sum(v for k, v in mem.items() if k not in ("total", "activations", "temporary",
                                                         "ddp_buckets"))
    assert state_bytes_per_param(cfg, dp) * out["params_per_rank"] == pytest.approx(state)
