"""Generation speed with and without the KV cache (greedy, one process), and
transformers' ``generate`` (with its KV cache) on the same model converted.

    python bench/generate.py                 # GPT-2 124M shape, 256 new tokens (~2 min here)
    python bench/generate.py --tokens 64     # quicker
    python bench/generate.py --model llama   # SmolLM2-135M's shape (rope, RMSNorm, SwiGLU,
                                             # 9 heads on 3 K/V heads), vs LlamaForCausalLM

Every run must pick the same tokens (checked: an untrained model's near-tied logits may
still differ in a late token between implementations; the first difference is reported);
the figure is new tokens per second.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.generate import decode_layout, generate  # noqa: E402
from megatron_lite.models import GPTModel  # noqa: E402
from megatron_lite.parallel import ParallelContext  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--model", choices=("gpt", "llama"), default="gpt")
    ap.add_argument("--reps", type=int, default=1,
                    help="then time ours and transformers' generate alternately this often")
    ap.add_argument("--cached-only", action="store_true",
                    help="skip our run without the KV cache (the slow one)")
    args = ap.parse_args()
    if args.model == "llama":  # SmolLM2-135M (configs/llama/smollm2-135m.yaml)
        cfg = ModelConfig(num_layers=30, hidden_size=576, num_attention_heads=9,
                          num_query_groups=3, ffn_hidden_size=1536, seq_length=2048,
                          max_position_embeddings=2048, vocab_size=49152,
                          normalization="rmsnorm", activation="swiglu",
                          position_embedding="rope", rope_theta=100000.0,
                          add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
        name = "Llama (SmolLM2-135M shape) 30L h576, 9 heads / 3 K/V heads, vocab 49152"
    else:
        cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                          num_attention_heads=args.hidden // 64, seq_length=1024,
                          max_position_embeddings=1024, vocab_size=50257)
        name = f"GPT {args.layers}L h{args.hidden}, vocab 50257"
    torch.manual_seed(0)
    model = GPTModel(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (16,)).tolist()
    print(f"{name}, prompt 16, {args.tokens} new tokens, greedy, fp32, "
          f"{torch.get_num_threads()} threads")
    out, speed = {}, {}
    runs = ((True, False), (True, True)) + (() if args.cached_only else ((False, True),))
    for use_cache, layout in runs:
        tick = time.perf_counter()
        with decode_layout(model) if layout else contextlib.nullcontext():
            entered = time.perf_counter() - tick
            tick = time.perf_counter()
            out[use_cache, layout] = generate(model, ParallelContext(), prompt, args.tokens,
                                              greedy=True, use_cache=use_cache)
            seconds = time.perf_counter() - tick
        speed[use_cache, layout] = args.tokens / seconds
        how = ("decode layout, as the CLI (entered once: "
               f"{entered:.2f} s)") if layout else "weights as trained (before issue 44)"
        print(f"  KV cache {'on ' if use_cache else 'off'}  {args.tokens / seconds:7.1f} tokens/s"
              f"  ({seconds:.1f} s)  {how}", flush=True)
    assert len(set(map(tuple, out.values()))) == 1, "the cache or the layout changed the tokens"

    from megatron_lite.models.hf import to_hf

    hf = to_hf(model).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        tick = time.perf_counter()
        theirs = hf.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                             do_sample=False, use_cache=True, pad_token_id=0)
        seconds = time.perf_counter() - tick
    theirs = theirs[0, len(prompt):].tolist()
    ours = out[True, True]  # the new tokens
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    hf_speed = args.tokens / seconds
    print(f"  transformers {hf_speed:7.1f} tokens/s  ({seconds:.1f} s, "
          f"{type(hf).__name__}.generate, KV cache)   ours / theirs: "
          f"{speed[True, True] / hf_speed:.2f}x (before: {speed[True, False] / hf_speed:.2f}x); "
          f"tokens {'identical' if same is None else f'first differ at new token {same}'}")
    if args.reps > 1:  # on a shared machine: alternate the two, compare medians
        times = {"ours": [], "theirs": []}
        for _ in range(args.reps):
            for who in times:
                tick = time.perf_counter()
                with torch.no_grad():
                    if who == "ours":
                        with decode_layout(model):
                            generate(model, ParallelContext(), prompt, args.tokens, greedy=True)
                    else:
                        hf.generate(ids, max_new_tokens=args.tokens,
                                    min_new_tokens=args.tokens, do_sample=False,
                                    use_cache=True, pad_token_id=0)
                times[who].append(time.perf_counter() - tick)
        ours_s, theirs_s = (statistics.median(t) for t in times.values())
        print(f"  alternating x{args.reps}, medians (ours in the decode layout, entering it "
              f"included): ours {args.tokens / ours_s:.1f}, transformers "
              f"{args.tokens / theirs_s:.1f} tokens/s: ours / theirs {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
