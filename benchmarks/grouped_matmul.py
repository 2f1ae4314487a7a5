"""Speed of the dropless grouped matmul alone, per implementation.

Times `tf_moe.ops.grouped_matmul.grouped_matmul` (rows [N, a] sorted by
expert, kernel [E, a, b]) forward, and forward+backward (gradients w.r.t.
rows and kernel), compiled (TF `tf.function(jit_compile=True)`, JAX
`jax.jit`). Implementations (--implementations):

    dense         one [N, a] @ [a, b] matmul: the same FLOPs, no grouping
    custom_call   tf_moe's custom call (on CUDA: TF_MOE_GROUPED_GEMM's
                  default, the CUTLASS kernel on Hopper for 16-bit types)
    custom_call:O[+O] the same with CUDA options (benchmarks/timing.py,
                  CUDA_OPTIONS): cutlass, streams, grouped; cooperative, pingpong;
                  1x2, 2x1, auto (the cooperative kernel's CTA cluster)
    reference     a per-tile weight gather (memory N / tile * a * b)
    ragged_dot    jax.lax.ragged_dot (JAX)
    tokamax       tokamax.ragged_dot where installed (JAX)

Segment sizes (--sizes_mode): "tiles", random multiples of --tile rows (what
"reference" needs); "uniform", a multinomial draw over E experts (what a
balanced router gives); "skewed", Zipf-like. TFLOP/s counts 2 N a b FLOPs
forward, 6 N a b forward+backward. Prints a table and writes JSON.

Usage:
    KERAS_BACKEND=jax python benchmarks/grouped_matmul.py
    KERAS_BACKEND=jax python benchmarks/grouped_matmul.py --rows 32768 --a 1024 \
        --b 4096 --experts 64 --dtype bfloat16 --sizes_mode uniform \
        --implementations dense,custom_call:cutlass,custom_call:streams,tokamax
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

from timing import cuda_options_env, time_step  # noqa: E402  (benchmarks/ is sys.path[0])
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


def forward_fn(implementation, layout):
    """(rows, kernel) -> [N, b] for one implementation."""
    if implementation == "dense":
        return lambda rows, kernel: ops.matmul(rows, kernel)  # kernel [a, b]
    if implementation == "tokamax":
        try:
            import tokamax
        except ModuleNotFoundError as error:
            if error.name != "xprof":
                raise
            # tokamax's package imports its benchmarking helper, which needs
            # the xprof profiler (30 MB and a dozen dependencies) that
            # ragged_dot does not use: stand in an empty module for it.
            import types

            for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
                sys.modules[name] = types.ModuleType(name)
            sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
            import tokamax

        return lambda rows, kernel: tokamax.ragged_dot(rows, kernel, layout.group_sizes)
    return lambda rows, kernel: grouped_matmul_lib.grouped_matmul(
        rows, kernel, layout, implementation.split(":")[0])


def step(implementation, layout, backward, repeat):
    """A compiled function (rows, kernel, cot) -> outputs, and a runner
    (JAX: `repeat` calls per run)."""
    forward = forward_fn(implementation, layout)

    if BACKEND == "jax":
        import jax

        if backward:
            # The value with both gradients (with the gradients alone, XLA
            # would drop the forward product the VJP does not need).
            def forward_backward(r, k, c):
                out, vjp = jax.vjp(forward, r, k)
                return out, *vjp(c)

            fn = jax.jit(forward_backward)
        else:
            fn = jax.jit(lambda r, k, c: forward(r, k))
        # `repeat` calls dispatched back to back, one wait: the GPU's time
        # per call without the host's dispatch and sync latency in each.
        def run(*args):
            for _ in range(repeat - 1):
                fn(*args)
            return jax.block_until_ready(fn(*args))

        return run
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def tf_fn(rows, kernel, cot):
        if not backward:
            return forward(rows, kernel)
        with tf.GradientTape() as tape:
            tape.watch([rows, kernel])
            out = forward(rows, kernel)
            loss = tf.reduce_sum(out * cot)
        return [out, *tape.gradient(loss, [rows, kernel])]

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
    parser.add_argument("--repeat", type=int, default=1,
                        help="JAX: calls per timed sample, dispatched back to back "
                             "(times are per call)")
    parser.add_argument("--sizes_mode", choices=("tiles", "uniform", "skewed"),
                        default="tiles")
    parser.add_argument("--implementations", default=None,
                        help="comma-separated (default: custom_call, reference, "
                             "and on JAX ragged_dot)")
    parser.add_argument("--json", default="grouped_matmul_benchmark.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.sizes_mode == "tiles":
        # Random segment sizes in tiles, summing to N.
        tiles = args.rows // args.tile
        cuts = np.sort(rng.choice(np.arange(1, tiles), args.experts - 1, replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [tiles]])) * args.tile
        tile = args.tile
    else:
        p = (np.ones(args.experts) if args.sizes_mode == "uniform"
             else 1.0 / np.arange(1, args.experts + 1) ** 1.2)
        sizes = rng.multinomial(args.rows, p / p.sum())
        tile = 1
    layout = layout_of(sizes, tile)
    rows = ops.convert_to_tensor(rng.normal(size=(args.rows, args.a)), args.dtype)
    kernel = ops.convert_to_tensor(
        rng.normal(size=(args.experts, args.a, args.b)) / np.sqrt(args.a), args.dtype)
    cot = ops.convert_to_tensor(rng.normal(size=(args.rows, args.b)), args.dtype)
    implementations = (args.implementations.split(",") if args.implementations else
                       ["custom_call", "reference"] + (["ragged_dot"] if BACKEND == "jax" else []))
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": BACKEND,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sizes": [int(s) for s in sizes],
        **{k: v for k, v in vars(args).items() if k != "json"},
    }
    print(json.dumps(info), flush=True)
    flops = 2.0 * args.rows * args.a * args.b
    results = []
    for implementation in implementations:
        row = {"implementation": implementation}
        env = cuda_options_env(implementation.partition(":")[2])
        os.environ.update(env)
        try:
            k = kernel[0] if implementation == "dense" else kernel  # dense: [a, b]
            for name, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
                run = step(implementation, layout, backward, args.repeat)
                median, _ = time_step(lambda: run(rows, k, cot), args.warmup, args.iters)
                row[name] = median * 1e3 / (args.repeat if BACKEND == "jax" else 1)
        except Exception as error:  # noqa: BLE001 - one row fails, the rest run
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"{implementation:>20} {row['error']}", flush=True)
            results.append(row)
            continue
        finally:
            for name in env:
                os.environ.pop(name)
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        row["fwd_bwd_tflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e9
        results.append(row)
    dense = next((r for r in results if r["implementation"] == "dense" and "error" not in r), None)
    print(f"{'implementation':>20} {'fwd ms':>9} {'TFLOP/s':>8} {'fwd+bwd ms':>11} "
          f"{'TFLOP/s':>8} {'x dense':>8}")
    for row in results:
        if "error" in row:
            continue
        if dense:
            row["fwd_bwd_vs_dense"] = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        ratio = f"{row['fwd_bwd_vs_dense']:.2f}" if dense else "-"
        print(f"{row['implementation']:>20} {row['fwd_ms']:9.3f} {row['fwd_tflops']:8.1f} "
              f"{row['fwd_bwd_ms']:11.3f} {row['fwd_bwd_tflops']:8.1f} {ratio:>8}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"info": info, "rows": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
