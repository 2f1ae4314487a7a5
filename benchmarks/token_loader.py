"""Batches per second of the token-cache train loader, side by side in one
process: Grain batches of `LmWindows` elements (one read and one stack per
window, the loader before 2026-12-02) against `token_cache.lm_loader`
(Grain shuffles and batches window indices, then one gather a batch). Both
yield the same batches (tests/token_cache_test.py); the trainer's tokens/s
cannot exceed the loader's.

Usage (a cache exported by `python -m tf_moe.data.token_cache`):
    python benchmarks/token_loader.py --cache_dir=/data/lm_cache \
        [--seq_len 64 --batch_size 256 --batches 300] [--json out.json]
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import grain  # noqa: E402
import numpy as np  # noqa: E402

from tf_moe.data import token_cache  # noqa: E402


def per_window(cache, args):
    source = token_cache.LmWindows(cache.tokens("train"), args.seq_len)
    dataset = (grain.MapDataset.source(source).seed(0).shuffle().repeat()
               .batch(args.batch_size, drop_remainder=True))
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(dataset.to_iter_dataset(options))


def batched(cache, args):
    return token_cache.lm_loader(cache, "train", args.seq_len, args.batch_size, seed=0,
                                 repeat=True)


def measure(make, cache, args):
    iterator = make(cache, args)
    first = next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return first, {
        "batches_per_sec": args.batches / seconds,
        "tokens_per_sec": args.batches * args.batch_size * args.seq_len / seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cache = token_cache.load_lm_cache(args.cache_dir)
    rows, firsts = {}, {}
    for name, make in (("per-window (Grain batch of LmWindows)", per_window),
                       ("lm_loader (batched gather)", batched)):
        firsts[name], rows[name] = measure(make, cache, args)
    same = all(np.array_equal(a, b) for a, b in zip(*firsts.values()))
    base = next(iter(rows.values()))["batches_per_sec"]
    print(f"train split of {args.cache_dir}, {args.batch_size} x {args.seq_len} tokens, "
          f"{args.batches} batches, {os.cpu_count()} CPUs ({platform.processor() or '?'})")
    print(f"{'loader':<40} {'batches/s':>10} {'tokens/s':>12} {'x':>6}")
    for name, row in rows.items():
        row["speedup"] = row["batches_per_sec"] / base
        print(f"{name:<40} {row['batches_per_sec']:>10.1f} {row['tokens_per_sec']:>12,.0f} "
              f"{row['speedup']:>6.2f}")
    print(f"first batch equal: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "first_batch_equal": same}, f,
                      indent=2)


if __name__ == "__main__":
    main()
