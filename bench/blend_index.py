"""The blend index on this machine: building it (once per run configuration), loading it
from the cache, and what a blended sample costs over a single corpus's.

    python bench/blend_index.py [--samples 1000000]

1. Build: samples/s of the greedy blend index (megatron_lite.data.blend) for 2 and 4
   sources, and the size of the cached ``.npy``.
2. Cache: seconds to open the cached index (memory-mapped) and count the samples drawn
   from each source by the first N (``samples_per_source``).
3. Reads: microseconds per GPT sample (seq 1024) of one shard vs a 2-source blend of
   it and a copy (the same tokens) of as many samples, on synthetic shards (twice each,
   alternating: the first pass also pays for page faults).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.data.blend import BlendedDataset, build_blend_index, parse_blend  # noqa: E402
from megatron_lite.data.gpt_dataset import GPTDataset  # noqa: E402
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetWriter  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=1_000_000)
    a = p.parse_args()
    print(f"1. building the blend index of {a.samples} samples")
    for k in (2, 4):
        weights = np.arange(1, k + 1, dtype=np.float64)
        tick = time.perf_counter()
        source, sample = build_blend_index(weights / weights.sum(), a.samples)
        seconds = time.perf_counter() - tick
        print(f"   {k} sources: {seconds:.2f} s, {a.samples / seconds / 1e6:.2f} M samples/s, "
              f"{16 * a.samples / 2**20:.1f} MiB cached")
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.RandomState(0)
        writer = IndexedDatasetWriter(Path(tmp) / "a", np.uint16)
        for _ in range(2000):
            writer.add_document([rng.randint(0, 50000, rng.randint(200, 3000)).tolist()])
        writer.finalize()
        for ext in (".bin", ".idx"):
            shutil.copyfile(Path(tmp) / f"a{ext}", Path(tmp) / f"b{ext}")
        seq, n = 1024, 20000
        sources = parse_blend(f"0.3 {tmp}/a 0.7 {tmp}/b")

        def make(j, source, planned):
            ix = IndexedDataset(source.prefix)
            return GPTDataset(ix, (0, ix.num_documents), seq, max(planned, 1), seed=1)

        BlendedDataset(sources, a.samples, make, "train")  # build and cache
        tick = time.perf_counter()
        blend = BlendedDataset(sources, a.samples, make, "train")
        drawn = blend.drawn(a.samples // 2)
        print(f"2. cached: opened and counted in {time.perf_counter() - tick:.3f} s "
              f"(cached={blend.cached}); samples_per_source at {a.samples // 2}: "
              f"{list(drawn.values())}")
        single = make(0, sources[0], n)  # the blend of the same size: its overhead alone
        small = BlendedDataset(sources, n, make, "train")
        for name, data in (("one shard", single), ("2-source blend", small)) * 2:
            order = rng.randint(0, n, 4000)
            tick = time.perf_counter()
            for i in order:
                data[int(i)]
            print(f"3. {name}: {(time.perf_counter() - tick) / len(order) * 1e6:.1f} us per "
                  f"{seq + 1}-token sample")


if __name__ == "__main__":
    main()
