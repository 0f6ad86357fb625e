import json, sys, time, torch
from pathlib import Path
from megatron_lite.config import load_config
from megatron_lite.parallel import ParallelContext
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
shard = sys.argv[1]; vocab = sys.argv[2]; merges = sys.argv[3]
def ov(run, **kw):
    base = {"model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
            "model.seq_length": 32, "model.max_position_embeddings": 32,
            "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
            "model.make_vocab_size_divisible_by": 8, "optim.warmup_steps": 2,
            "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.max_steps": 10,
            "train.log_interval": 1, "train.eval_interval": 5, "train.eval_iters": 2,
            "train.run_dir": run, "log.tensorboard": False,
            "data.data_path": shard, "data.tokenizer_type": "GPT2BPETokenizer",
            "data.vocab_file": vocab, "data.merge_file": merges}
    base.update(kw); return [f"{k}={v}" for k, v in base.items()]
def body(ctx, run, kw):
    t=time.time(); Trainer(load_config(None, ov(run, **kw)), ctx).fit(); print(run, time.time()-t, flush=True)
def losses(run): return [json.loads(l)["loss"] for l in open(run + "/metrics.jsonl")]
if __name__ == "__main__":
    tp = int(sys.argv[4]); extra = dict(a.split("=") for a in sys.argv[5:])
    for c in ("false", "true"):
        run = f"/tmp/w/run_c{c}_tp{tp}"
        import shutil; shutil.rmtree(run, ignore_errors=True)
        run_distributed(body, tp, run, {"train.compile": c, "parallel.tensor_parallel_size": tp, **extra}, tp_size=tp)
    a, b = losses(f"/tmp/w/run_cfalse_tp{tp}"), losses(f"/tmp/w/run_ctrue_tp{tp}")
    print(a); print(b); print("max diff", max(abs(x-y) for x,y in zip(a,b)))
