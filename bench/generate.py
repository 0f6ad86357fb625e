"""Generation speed with and without the KV cache (greedy, one process), and
transformers' ``generate`` (with its KV cache) on the same model converted.

    python bench/generate.py                 # GPT-2 124M shape, 256 new tokens (~2 min here)
    python bench/generate.py --tokens 64     # quicker

Every run must pick the same tokens (checked: an untrained model's near-tied logits may
still differ in a late token between implementations; the first difference is reported);
the figure is new tokens per second.
"""

from __future__ import annotations

import argparse
import contextlib
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
    args = ap.parse_args()
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=args.hidden // 64, seq_length=1024,
                      max_position_embeddings=1024, vocab_size=50257)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (16,)).tolist()
    print(f"GPT {args.layers}L h{args.hidden}, vocab 50257, prompt 16, {args.tokens} new "
          f"tokens, greedy, fp32, {torch.get_num_threads()} threads")
    out, speed = {}, {}
    for use_cache, layout in ((True, False), (True, True), (False, True)):
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
          f"GPT2LMHeadModel.generate, KV cache)   ours / theirs: "
          f"{speed[True, True] / hf_speed:.2f}x (before: {speed[True, False] / hf_speed:.2f}x); "
          f"tokens {'identical' if same is None else f'first differ at new token {same}'}")


if __name__ == "__main__":
    main()
