"""launch/torchrun.sh as two "nodes": two torchrun agents on this machine, one process
each, meeting through a c10d rendezvous on localhost, TP=2 across them."""

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import gpt_shard, tiny_overrides  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow  # three torchrun agents, two of them meeting over a rendezvous
def test_two_agents_as_two_nodes_train_like_one_node(gpt_shard, bpe_files, tmp_path):  # noqa: F811
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: gpt\n")

    def overrides(run):
        return tiny_overrides(gpt_shard, bpe_files, tmp_path / run, **{
            "parallel.tensor_parallel_size": 2, "train.max_steps": 4,
            "train.eval_interval": 0, "train.log_interval": 1})

    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    one = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), str(config),
                          *overrides("one")], env=dict(env, NPROC_PER_NODE="2"),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    nodes = dict(env, NNODES="2", NPROC_PER_NODE="1", RDZV_ID=f"t{secrets.token_hex(4)}",
                 RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}")
    agents = [subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), str(config),
                                *overrides("two")], env=nodes,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=300)[0])
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert len(_losses(tmp_path / "one")) == 4
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one")
    saved = (tmp_path / "two" / "config.yaml").read_text()
    assert "tensor_parallel_size: 2" in saved
