"""End-to-end training throughput of the Transformer-MoE language model per
dispatch path, against the dense model of equal active FLOPs.

Each row builds and compiles the model as the trainer does
(`trainers.transformer_moe.build_model`: Keras's Adam with the trainer's
warmup/cosine schedule and global-norm clipping, cross-entropy from logits,
the perplexity metric, XLA) and times `model.fit` on random tokens: one fit
of `--warmup` steps compiles, then `--repeat` fits of `--steps` steps each
are timed whole (each ends in a host synchronization), and the row reports
their median tokens/s. Rows:

    dense        every block a dense FFN (ffn_hidden_dim)
    einsum, gather, custom_call
                 every `moe_every`-th block an MoE of `experts` experts, top-k,
                 expert_hidden_dim each, capacity factor `capacity_factor`
    dropless     custom_call with capacity_factor=None (grouped matmuls)
    PATH@O[+O]   PATH with the CUDA handler options of benchmarks/timing.py
                 (dropless@streams: cuBLAS per expert instead of CUTLASS)

With k * expert_hidden_dim = ffn_hidden_dim (the presets) an MoE block has
the active FLOPs of a dense one, so "x dense" is the price of routing,
dispatch and the expert kernels in a whole training step. Every row runs in
its own process (a crash stays in its row). Prints a table and writes JSON.

    KERAS_BACKEND=jax python benchmarks/decoder_lm.py --preset gpu \\
        --experts 16,64 --json decoder_lm.json
    KERAS_BACKEND=jax python benchmarks/decoder_lm.py --preset cpu  # smoke run
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import keras  # noqa: E402
import numpy as np  # noqa: E402

from timing import cuda_options_env  # noqa: E402

BACKEND = keras.backend.backend()
PATHS = ("dense", "gather", "custom_call", "dropless")

# The issue-12 model on one GPU (8 blocks, d = 1024, 16 heads, 16 x 1024
# tokens, 32k vocabulary, MoE in every other block with k = 2 experts of
# 2048 against dense FFNs of 4096); a tiny one that runs on a CPU in seconds.
PRESETS = {
    "gpu": dict(num_layers=8, dim=1024, num_heads=16, sequence_length=1024, batch_size=16,
                vocab_size=32000, ffn_hidden_dim=4096, expert_hidden_dim=2048, k=2,
                capacity_factor=1.25, group_size=1024, dtype_policy="mixed_bfloat16"),
    "cpu": dict(num_layers=2, dim=64, num_heads=2, sequence_length=64, batch_size=4,
                vocab_size=512, ffn_hidden_dim=256, expert_hidden_dim=128, k=2,
                capacity_factor=1.25, group_size=64, dtype_policy="float32"),
}


def make_config(preset, path, experts, dropout):
    """The trainer's config for one row (transformer_moe_base's schema)."""
    from configs import transformer_moe_base

    p = PRESETS[preset]
    config = transformer_moe_base.get_config()
    config.task = "lm"
    config.data.update(vocab_size=p["vocab_size"], sequence_length=p["sequence_length"])
    base = path.partition("@")[0]
    config.model.update(
        dim=p["dim"], num_heads=p["num_heads"], num_layers=p["num_layers"],
        ffn_hidden_dim=p["ffn_hidden_dim"], dropout=dropout, expert_dropout=dropout,
        # dense: moe_every past the last block, so no block is an MoE.
        moe_every=p["num_layers"] + 1 if base == "dense" else 2,
        num_experts=experts, k=p["k"], expert_hidden_dim=p["expert_hidden_dim"],
        capacity_factor=None if base == "dropless" else p["capacity_factor"],
        group_size=p["group_size"],
        dispatch="custom_call" if base in ("dense", "dropless") else base,
    )
    config.train.update(batch_size=p["batch_size"], steps=100_000, warmup_steps=100,
                        jit_compile=True, dtype_policy=p["dtype_policy"])
    return config


def worker(args):
    """One row in this process: prints `RESULT {json}`."""
    from trainers import loop, transformer_moe

    started = time.perf_counter()
    config = make_config(args.preset, args.worker, args.worker_experts, args.dropout)
    loop.set_dtype_policy(config.train)
    keras.utils.set_random_seed(0)
    model = transformer_moe.build_model(config, config.data.vocab_size)
    batch, length = config.train.batch_size, config.data.sequence_length
    steps = max(args.warmup, args.steps)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.data.vocab_size, (batch * steps, length), dtype=np.int32)
    y = np.roll(x, -1, axis=1)

    def fit(n):
        start = time.perf_counter()
        history = model.fit(x[: batch * n], y[: batch * n], batch_size=batch, epochs=1,
                            shuffle=False, verbose=0)
        # On JAX `fit` can return before the device is done: reading the last
        # step's loss (an output of the same program as its update) waits.
        loss = float(history.history["loss"][-1])
        return time.perf_counter() - start, loss

    def progress(what):
        print(f"    {args.worker} E={args.worker_experts}: {what}", file=sys.stderr, flush=True)

    progress(f"built in {time.perf_counter() - started:.1f} s")
    compile_seconds, _ = fit(args.warmup)
    progress(f"first fit ({args.warmup} steps, compiling) {compile_seconds:.1f} s")
    times, losses = [], []
    for _ in range(args.repeat):
        seconds, loss = fit(args.steps)
        times.append(seconds)
        losses.append(loss)
        progress(f"fit of {args.steps} steps {seconds:.2f} s, loss {loss:.3f}")
    total, active = loop.parameter_counts(model)
    seconds = float(np.median(times))
    tokens = args.steps * batch * length
    return {
        "path": args.worker, "experts": None if args.worker == "dense" else args.worker_experts,
        "ms_per_step": seconds / args.steps * 1e3, "tokens_per_s": tokens / seconds,
        "tokens_per_s_all": [tokens / t for t in times],
        "first_fit_s": compile_seconds, "loss": losses[-1],
        "finite": bool(np.all(np.isfinite(losses))),
        "total_parameters": int(total), "active_parameters_per_token": int(active),
        "plan": None if args.worker == "dense" else _plan_path(model),
    }


def _plan_path(model):
    """The dispatch path the first MoE layer planned ("dropless" if so)."""
    from tf_moe.metrics import moe_layers

    plan = moe_layers(model)[0].plan(training=True)
    return "dropless" if plan.dropless else plan.path


def run_row(path, experts, args):
    options = path.partition("@")[2]
    env = dict(os.environ, **cuda_options_env(options))
    command = [sys.executable, os.path.abspath(__file__), "--preset", args.preset,
               "--worker", path, "--worker_experts", str(experts), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--repeat", str(args.repeat),
               "--dropout", str(args.dropout)]
    # The worker's stderr (its progress lines, and any traceback) goes on to
    # ours as it comes, so that a row stopped by a time limit still says how
    # far it got.
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"path": path, "experts": experts,
            "error": f"exit {result.returncode} (its traceback is in the log above)"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated rows (dense once, the others per --experts)")
    parser.add_argument("--experts", default="16,64", help="comma-separated expert counts")
    parser.add_argument("--warmup", type=int, default=5, help="steps of the compiling fit")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed fit")
    parser.add_argument("--repeat", type=int, default=3, help="timed fits per row")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout and expert dropout (0: throughput without the "
                             "random numbers of attention dropout; the recipes use 0.1)")
    parser.add_argument("--json", default="decoder_lm_benchmark.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_experts", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if min(args.warmup, args.steps, args.repeat) < 1:
        parser.error("--warmup, --steps and --repeat must be >= 1")
    import jax

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": BACKEND, "device": str(jax.devices()[0].device_kind) if BACKEND == "jax"
        else "tensorflow", "jax": jax.__version__, "keras": keras.__version__,
        "preset": PRESETS[args.preset], "args": vars(args), "statistic": "median",
        "load_average": os.getloadavg(),
    }
    print(json.dumps(info), flush=True)
    rows = []
    experts = [int(e) for e in args.experts.split(",")]
    for path in args.paths.split(","):
        for e in experts[:1] if path.partition("@")[0] == "dense" else experts:
            row = run_row(path, e, args)
            rows.append(row)
            print(f"  {path} E={row['experts']}: {row.get('tokens_per_s', row.get('error'))}",
                  file=sys.stderr, flush=True)
    dense = next((r for r in rows if r["path"] == "dense" and "tokens_per_s" in r), None)
    print(f"{'path':>22} {'E':>4} {'ms/step':>9} {'tokens/s':>10} {'x dense':>8} "
          f"{'params (M)':>11} {'active (M)':>11} {'loss':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:>22} {r['experts'] or '-':>4} {r['error']}")
            continue
        r["vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None
        ratio = "-" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}"
        print(f"{r['path']:>22} {r['experts'] or '-':>4} {r['ms_per_step']:9.1f} "
              f"{r['tokens_per_s']:10.0f} {ratio:>8} {r['total_parameters'] / 1e6:11.1f} "
              f"{r['active_parameters_per_token'] / 1e6:11.1f} {r['loss']:7.3f}")
    with open(args.json, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
