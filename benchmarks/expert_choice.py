"""Expert-choice MoE layer, forward+backward: tf_moe's dispatch paths against a
dense FFN doing the same FLOPs and against TensorFlow Model Garden's
`MoeLayer` with its `ExpertsChooseMaskedRouter`.

Size (issue "one dispatch seam"): B=8 x L=512 tokens, d=256, h=1024, E=16,
capacity factor 1.25 (C = 40 per group of 512; both libraries compute C the
same way here), relu experts, no dropout, TF `tf.function(jit_compile=True)`,
the gradient w.r.t. the input and every weight. The dense FFN runs on
E * C * G = 5,120 rows (the expert FLOPs of the layer): the floor any layer
of this size can reach.

Model Garden needs its own environment (its pins conflict with TF 2.21):

    python3 -m venv /tmp/mg && /tmp/mg/bin/pip install tensorflow==2.21.0 \
        tf-keras==2.21.0 gin-config scipy && \
        /tmp/mg/bin/pip install tf-models-official==2.20.0 --no-deps
    KERAS_BACKEND=tensorflow python benchmarks/expert_choice.py \
        --model-garden-python /tmp/mg/bin/python --rounds 3

Each round runs our rows (dense; "experts": the expert FFNs alone on their
capacity buffers; einsum, gather, custom_call, auto) in one process and Model Garden's in another, one after the other, so that the
machine's load is shared; the table gives each row's median over rounds and
its ratio to the dense FFN of the same round. Writes JSON (--json).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np

from timing import tf_grad_step, time_step

BATCH, SEQ, D, H, E, CAPACITY_FACTOR = 8, 512, 256, 1024, 16, 1.25
OURS = ("dense", "experts", "einsum", "gather", "custom_call", "auto")


def _capacity():
    return int(np.ceil(CAPACITY_FACTOR * SEQ / E))


def ours(path):
    import keras

    import tf_moe

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if path == "dense":
        rows = E * _capacity() * BATCH  # G = B groups of L tokens
        model = keras.Sequential(
            [keras.layers.Dense(H, activation="relu"), keras.layers.Dense(D)]
        )
        shape = (rows, D)
    elif path == "experts":
        # The E expert FFNs alone on their [E, G, C, d] buffers (no routing,
        # no dispatch): the floor of any layer with separate expert GEMMs.
        model = tf_moe.layers.Experts(E, H)
        shape = (E, BATCH, _capacity(), D)
    else:
        model = tf_moe.layers.MoE(
            num_experts=E,
            expert_hidden_dim=H,
            router=tf_moe.routing.ExpertChoiceRouter(),
            capacity_factor=CAPACITY_FACTOR,
            min_capacity=1,
            group_size=SEQ,
            dispatch=path,
        )
        shape = (BATCH, SEQ, D)
    model.build(shape)
    x = keras.ops.convert_to_tensor(rng.normal(size=shape).astype(np.float32))
    cotangent = keras.ops.convert_to_tensor(rng.normal(size=shape).astype(np.float32))
    return tf_grad_step(model, x, cotangent)


def model_garden():
    import tensorflow as tf
    import tf_keras
    from official.nlp.modeling.layers import moe

    tf.random.set_seed(0)
    layer = moe.MoeLayer(
        moe.FeedForwardExperts(E, H, activation=tf_keras.activations.relu),
        moe.ExpertsChooseMaskedRouter(E),
        train_capacity_factor=CAPACITY_FACTOR,
        examples_per_group=1.0,  # groups of L = 512 tokens
    )
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, SEQ, D)).astype(np.float32))
    cotangent = tf.constant(rng.normal(size=(BATCH, SEQ, D)).astype(np.float32))
    layer(x, training=True)  # build
    return tf_grad_step(layer, x, cotangent)


def worker(impl, paths, warmup, iters):
    """Times `paths` of `impl` in this process; prints one JSON line each."""
    for path in paths:
        run = model_garden() if impl == "model_garden" else ours(path)
        median, best = time_step(run, warmup, iters)
        print("RESULT " + json.dumps({"impl": impl, "path": path, "ms": median * 1e3,
                                      "best_ms": best * 1e3}), flush=True)


def run_worker(python, impl, paths, args):
    command = [python, os.path.abspath(__file__), "--worker", impl, "--paths", ",".join(paths),
               "--warmup", str(args.warmup), "--iters", str(args.iters)]
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    rows = [json.loads(line[7:]) for line in result.stdout.splitlines()
            if line.startswith("RESULT ")]
    if result.returncode or not rows:
        raise RuntimeError(f"{impl} worker failed (exit {result.returncode}):\n"
                           + "\n".join(result.stderr.splitlines()[-20:]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-garden-python", default=None,
                        help="python of a venv with tf-models-official (omit to skip)")
    parser.add_argument("--paths", default=",".join(OURS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--json", default="expert_choice_benchmark.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = args.paths.split(",")
    if args.worker:
        worker(args.worker, paths if args.worker == "ours" else ["MoeLayer"],
               args.warmup, args.iters)
        return
    rounds = []
    for index in range(args.rounds):
        rows = run_worker(sys.executable, "ours", paths, args)
        if args.model_garden_python:
            rows += run_worker(args.model_garden_python, "model_garden", paths, args)
        dense = next(r["ms"] for r in rows if r["path"] == "dense")
        for row in rows:
            row["round"] = index
            row["x_dense_time"] = row["ms"] / dense
        rounds += rows
        print(" ".join(f"{r['path']}={r['ms']:.1f}" for r in rows), flush=True)
    table = []
    for key in dict.fromkeys((r["impl"], r["path"]) for r in rounds):
        mine = [r for r in rounds if (r["impl"], r["path"]) == key]
        table.append({
            "impl": key[0], "path": key[1],
            "ms_median": statistics.median(r["ms"] for r in mine),
            "ms_runs": [round(r["ms"], 1) for r in mine],
            "x_dense_time_median": statistics.median(r["x_dense_time"] for r in mine),
        })
    mg = next((r for r in table if r["impl"] == "model_garden"), None)
    print(f"\n{'impl':>13} {'path':>12} {'ms':>8} {'x dense time':>13} {'MG / this':>10}  runs (ms)")
    for r in table:
        speedup = "-" if mg is None else f"{mg['ms_median'] / r['ms_median']:.2f}"
        print(f"{r['impl']:>13} {r['path']:>12} {r['ms_median']:8.1f} "
              f"{r['x_dense_time_median']:13.2f} {speedup:>10}  {r['ms_runs']}")
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "size": dict(batch=BATCH, seq=SEQ, d=D, h=H, experts=E,
                     capacity_factor=CAPACITY_FACTOR, capacity=_capacity()),
        "rounds": args.rounds, "warmup": args.warmup, "iters": args.iters,
        "statistic": "median over rounds of the per-round median",
    }
    with open(args.json, "w") as f:
        json.dump({"info": info, "table": table, "runs": rounds}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
