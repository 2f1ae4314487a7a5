"""Forward+backward throughput of the MoE layer per dispatch path, against a
dense FFN with the same active FLOPs.

For each size, times one jitted step computing the layer output and the
gradients w.r.t. the input and all trainable weights (router and auxiliary
losses included): TensorFlow under tf.function(jit_compile=True), JAX under
jax.jit (Keras-on-JAX, `stateless_call`). Rows:

    dense        FFN d -> k*h -> d on the T tokens (same active FLOPs)
    einsum       MoE(dispatch="einsum")   one-hot dispatch/combine
    gather       MoE(dispatch="gather")   sort/gather
    custom_call  MoE(dispatch="custom_call")
    dropless     MoE(dispatch="custom_call", capacity_factor=None): no
                 capacity buffers, grouped matmuls over expert segments
    PATH@O[+O]   PATH with options: cutlass/streams/grouped set
                 TF_MOE_GROUPED_GEMM (dropless@cutlass: the Hopper grouped
                 GEMM), sync/deferred set TF_MOE_CHECK_ROUTING
                 (custom_call@deferred: no stream sync per dispatch/combine),
                 cooperative/pingpong set TF_MOE_CUTLASS_SCHEDULE,
                 1x2/2x1/auto TF_MOE_CUTLASS_CLUSTER
    PATH+unfused dropless without the bias and relu fused into the grouped
                 matmul (dropless+unfused@cutlass)

Useful FLOPs = 12 * T * k * d * h (two matmuls, forward and twice backward),
the same for every row; TFLOP/s = useful FLOPs / time. Capacity padding,
routing and dispatch count as overhead. Prints a table and writes JSON.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/moe_layer.py --preset cpu
    KERAS_BACKEND=jax python benchmarks/moe_layer.py --preset gpu --json out.json
"""

import argparse
import datetime
import json
import os
import platform
import sys

import keras
import numpy as np

import tf_moe
from timing import cuda_options_env, tf_grad_step, time_step
from tf_moe.ops import custom_call
from tf_moe.ops.plan import resolve_plan

BACKEND = keras.backend.backend()

# name: (batch, seq, d, h, E, k, capacity_factor, group_size, dtype policy)
PRESETS = {
    "cpu": [
        ("small", 4, 256, 128, 512, 8, 2, 1.25, 512, "float32"),
        ("target", 8, 512, 256, 1024, 16, 2, 1.25, 1024, "float32"),
        ("wide_e", 8, 512, 256, 512, 64, 2, 1.25, 1024, "float32"),
    ],
    "gpu": [
        ("medium", 8, 1024, 1024, 4096, 16, 2, 1.25, 1024, "bfloat16"),
        ("target", 16, 1024, 1024, 4096, 64, 2, 1.25, 1024, "bfloat16"),
        ("target_g4096", 16, 1024, 1024, 4096, 64, 2, 1.25, 4096, "bfloat16"),
        ("target_e8", 16, 1024, 1024, 4096, 8, 2, 1.25, 1024, "bfloat16"),
        ("target_e256", 16, 1024, 1024, 4096, 256, 2, 1.25, 1024, "bfloat16"),
    ],
}
PATHS = ("dense", "einsum", "gather", "custom_call", "dropless")


def build_layer(path, d, h, num_experts, k, capacity_factor, group_size, dtype):
    """The layer for row `path`; a trailing "+bf16experts" rebuilds the MoE's
    Experts sublayer with the MoE's dtype policy (the what-if that found the
    Experts dtype bug; a no-op since `MoE` passes its policy to `Experts`,
    kept to rerun the historical table in docs/benchmarks.md); "+unfused"
    keeps the dropless experts' bias and relu out of the grouped matmul
    (`grouped_matmul_bias`), as before the fused epilogue."""
    what_if = path.endswith("+bf16experts")
    path = path.replace("+bf16experts", "")
    unfused = path.endswith("+unfused")
    path = path.replace("+unfused", "")
    if path == "dense":
        return keras.Sequential(
            [
                keras.layers.Dense(k * h, activation="relu", dtype=dtype),
                keras.layers.Dense(d, dtype=dtype),
            ]
        )
    dropless = path == "dropless"
    layer = tf_moe.layers.MoE(
        num_experts=num_experts,
        expert_hidden_dim=h,
        router=tf_moe.routing.TopKRouter(k=k),
        capacity_factor=None if dropless else capacity_factor,
        group_size=group_size,
        dispatch="custom_call" if dropless else path,
        dtype=dtype,
    )
    if dropless and not layer.runs_dropless(training=True):
        raise RuntimeError("the dropless row needs the custom-call libraries")
    if what_if:
        config = layer.experts.get_config()
        config["dtype"] = layer.dtype_policy
        layer.experts = tf_moe.layers.experts.Experts.from_config(config)
    if unfused:
        ffn = layer.experts.ffn
        layer.experts.ffn = lambda *args, matmul_bias=None, **kwargs: ffn(*args, **kwargs)
    return layer


def jax_step(layer, x, cotangent, repeat=1):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss_fn(trainable, x):
        y, _, losses = layer.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        loss = jnp.sum(y.astype(jnp.float32) * cotangent)
        return loss + sum(losses) if losses else loss

    grad = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))

    def run():  # `repeat` steps dispatched back to back, one wait
        for _ in range(repeat - 1):
            grad(trainable, x)
        jax.block_until_ready(grad(trainable, x))

    return run


def bench(size, paths, warmup, iters, repeat=1):
    name, batch, seq, d, h, num_experts, k, capacity_factor, group_size, dtype = size
    tokens = batch * seq
    rng = np.random.default_rng(0)
    x_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    x = keras.ops.convert_to_tensor(rng.normal(size=(tokens, d)), dtype=x_dtype)
    cotangent = keras.ops.convert_to_tensor(rng.normal(size=(tokens, d)).astype(np.float32))
    useful_flops = 12.0 * tokens * k * d * h
    rows = []
    for path in paths:
        if path.startswith(("custom_call", "dropless")) and not custom_call.is_available():
            rows.append({"size": name, "path": path, "error": "library not available"})
            continue
        keras.utils.set_random_seed(0)
        layer = build_layer(path, d, h, num_experts, k, capacity_factor, group_size, dtype)
        layer.build((tokens, d))
        if BACKEND == "jax":
            run = jax_step(layer, x, cotangent, repeat)
        else:
            run, repeat = tf_grad_step(layer, x, cotangent), 1
        median, best = time_step(run, warmup, iters)
        median, best = median / repeat, best / repeat
        rows.append(
            {
                "size": name,
                "path": path,
                "tokens": tokens,
                "d": d,
                "h": h,
                "experts": num_experts,
                "k": k,
                "capacity_factor": None if path == "dropless" else capacity_factor,
                "group_size": group_size,
                "dtype": dtype,
                "ms": median * 1e3,
                "best_ms": best * 1e3,
                "tokens_per_s": tokens / median,
                "tflops": useful_flops / median / 1e12,
            }
        )
    return rows


def add_ratios(rows):
    """vs_dense = dense time / time; speedup_vs_einsum = einsum time / time."""
    dense = next((r for r in rows if r["path"] == "dense" and "ms" in r), None)
    einsum = next((r for r in rows if r["path"] == "einsum" and "ms" in r), None)
    for row in rows:
        if "ms" in row:
            row["vs_dense"] = dense["ms"] / row["ms"] if dense else None
            row["speedup_vs_einsum"] = einsum["ms"] / row["ms"] if einsum else None


def device_name():
    if BACKEND == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {getattr(device, 'device_kind', device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def print_table(rows):
    header = f"{'size':>13} {'path':>12} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'x dense':>8} {'x einsum':>9}"
    print(header)
    for r in rows:
        if "ms" not in r:
            print(f"{r['size']:>13} {r['path']:>12} {r['error']}")
            continue
        ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(
            f"{r['size']:>13} {r['path']:>12} {r['ms']:9.2f} {r['tokens_per_s']:11.0f} "
            f"{r['tflops']:8.3f} {ratio(r['vs_dense']):>8} {ratio(r['speedup_vs_einsum']):>9}"
        )


def run_worker(size_name, path, args):
    """Benchmarks one (size, path) in a subprocess: a crash in one path (e.g.
    an XLA check failure) does not take the others down."""
    import subprocess

    base, _, options = path.partition("@")
    env = dict(os.environ, **cuda_options_env(options))
    command = [
        sys.executable, os.path.abspath(__file__), "--preset", args.preset,
        "--worker", f"{size_name}:{base}", "--warmup", str(args.warmup),
        "--iters", str(args.iters), "--repeat", str(args.repeat),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]), path=path)
    tail = (result.stderr.strip().splitlines() or ["?"])[-1][:200]
    for line in result.stderr.splitlines():
        if "Check failed" in line or "Error" in line:
            tail = line.strip()[:200]
            break
    return {"size": size_name, "path": path, "error": f"exit {result.returncode}: {tail}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated size names")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1,
                        help="JAX: steps per timed sample, dispatched back to back "
                             "(times are per step; 1 = a wait after every step)")
    parser.add_argument("--json", default="moe_layer_benchmark.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = {s[0]: s for s in PRESETS[args.preset]}
    if args.worker:
        size_name, path = args.worker.split(":")
        (row,) = bench(sizes[size_name], [path], args.warmup, args.iters, args.repeat)
        print("RESULT " + json.dumps(row))
        return
    names = args.sizes.split(",") if args.sizes else list(sizes)
    paths = args.paths.split(",")
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": BACKEND,
        "device": device_name(),
        "keras": keras.__version__,
        "auto": resolve_plan("auto").path,
        "compile": "tf.function(jit_compile=True)" if BACKEND == "tensorflow" else "jax.jit",
        "warmup": args.warmup,
        "iters": args.iters,
        "repeat": args.repeat,
        "statistic": "median",
    }
    print(json.dumps(info), flush=True)
    rows = []
    for name in names:
        size_rows = []
        for path in paths:
            row = run_worker(name, path, args)
            size_rows.append(row)
            print(f"  {name:>13} {path:>12}: {row.get('ms', row.get('error'))}",
                  file=sys.stderr, flush=True)
        add_ratios(size_rows)
        rows.extend(size_rows)
    print_table(rows)
    with open(args.json, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
