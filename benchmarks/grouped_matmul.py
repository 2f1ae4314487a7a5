"""Speed of the dropless grouped matmul alone, per implementation.

Times `tf_moe.ops.grouped_matmul.grouped_matmul` (rows [N, a] sorted by
expert, kernel [E, a, b]) forward, and forward+backward (gradients w.r.t.
rows and kernel), compiled (TF `tf.function(jit_compile=True)`, JAX
`jax.jit`), for "custom_call", "reference" and, on JAX, "ragged_dot". Segment
sizes are multiples of --tile rows so that "reference" (a per-tile weight
gather, memory N / tile * a * b) fits. Prints a table and writes JSON.

Usage:
    KERAS_BACKEND=jax python benchmarks/grouped_matmul.py
    KERAS_BACKEND=tensorflow python benchmarks/grouped_matmul.py --json out.json
"""

import argparse
import datetime
import json
import os
import platform
import sys

import keras
import numpy as np
from keras import ops

from timing import time_step  # noqa: E402  (benchmarks/ is sys.path[0])
from tf_moe.ops import dropless
from tf_moe.ops import grouped_matmul as grouped_matmul_lib

BACKEND = keras.backend.backend()


def layout_of(sizes, tile):
    """A `DroplessLayout` with segment sizes `sizes` (multiples of `tile`)."""
    expert = np.repeat(np.arange(len(sizes)), np.asarray(sizes) // tile).astype(np.int32)
    return dropless.DroplessLayout(
        row=None,
        group_sizes=ops.convert_to_tensor(np.asarray(sizes, np.int32)),
        tile_expert=ops.convert_to_tensor(expert),
        row_owner=None,
        num_rows=int(sum(sizes)),
        tile=tile,
    )


def step(implementation, layout, backward):
    """A compiled function (rows, kernel, cot) -> outputs, and a runner."""

    def forward(rows, kernel):
        return grouped_matmul_lib.grouped_matmul(rows, kernel, layout, implementation)

    if BACKEND == "jax":
        import jax

        if backward:
            fn = jax.jit(lambda r, k, c: jax.grad(
                lambda r, k: (forward(r, k) * c).sum(), argnums=(0, 1))(r, k))
        else:
            fn = jax.jit(lambda r, k, c: forward(r, k))
        return lambda *args: jax.block_until_ready(fn(*args))
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def tf_fn(rows, kernel, cot):
        if not backward:
            return forward(rows, kernel)
        with tf.GradientTape() as tape:
            tape.watch([rows, kernel])
            loss = tf.reduce_sum(forward(rows, kernel) * cot)
        return tape.gradient(loss, [rows, kernel])

    # (The reference path's kernel gradient comes as IndexedSlices.)
    return lambda *args: [tf.convert_to_tensor(t).numpy() for t in tf.nest.flatten(tf_fn(*args))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="N")
    parser.add_argument("--a", type=int, default=256)
    parser.add_argument("--b", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--json", default="grouped_matmul_benchmark.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Random segment sizes in tiles, summing to N.
    tiles = args.rows // args.tile
    cuts = np.sort(rng.choice(np.arange(1, tiles), args.experts - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [tiles]])) * args.tile
    layout = layout_of(sizes, args.tile)
    rows = ops.convert_to_tensor(rng.normal(size=(args.rows, args.a)), args.dtype)
    kernel = ops.convert_to_tensor(rng.normal(size=(args.experts, args.a, args.b)), args.dtype)
    cot = ops.convert_to_tensor(rng.normal(size=(args.rows, args.b)), args.dtype)
    implementations = ["custom_call", "reference"] + (["ragged_dot"] if BACKEND == "jax" else [])
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": BACKEND,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sizes": [int(s) for s in sizes],
        **{k: v for k, v in vars(args).items() if k != "json"},
    }
    print(json.dumps(info), flush=True)
    results = []
    for implementation in implementations:
        row = {"implementation": implementation}
        for name, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
            run = step(implementation, layout, backward)
            median, _ = time_step(lambda: run(rows, kernel, cot), args.warmup, args.iters)
            row[name] = median * 1e3
        results.append(row)
        print(f"{implementation:>12} fwd {row['fwd_ms']:8.1f} ms   fwd+bwd "
              f"{row['fwd_bwd_ms']:8.1f} ms", flush=True)
    with open(args.json, "w") as f:
        json.dump({"info": info, "rows": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
