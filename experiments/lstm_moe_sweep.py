r"""Runs the equal-compute LSTM-MoE sweep (configs/lstm_moe_sweep.py) and
writes one JSON per run: perplexities, parameters, ops per timestep,
tokens/s, TFLOP/s and routing health.

    KERAS_BACKEND=jax python experiments/lstm_moe_sweep.py \
        --cache_dir=/data/lm_cache --out=results/sweep [--runs=dense,moe64] \
        [--corpus=tf_moe_lm_en_large] \
        [--seeds=0,1 --seeded=dense,moe64] [--time_budget_s=540]

Each run is `python -m trainers.lstm_moe` in its own process and workdir
(<runs_dir>/<name>_s<seed>, default <out>/runs/...), so an interrupted sweep resumes where it
stopped: finished runs are skipped, a half-finished one resumes from its
checkpoint. `--time_budget_s` stops starting new runs after that many
seconds (a lent GPU's per-command limit). experiments/sweep_report.py turns
the JSON files into docs/results.md's table and plot.
"""

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import lstm_moe_sweep  # noqa: E402

CONFIG = "configs/lstm_moe_sweep.py"


def ffn_block_macs(model):
    """Multiply-adds per token of the FFN block (experts run plus gating)."""
    d, h = model.dim, model.expert_hidden_dim
    if model.get("dense_ffn_hidden_dim") is not None:
        return 2 * d * model.dense_ffn_hidden_dim
    if model.hierarchical:
        experts = model.primary_k * model.secondary_k
        # Noisy gating: a gate and a noise kernel, primary over the groups,
        # secondary over one group's experts for each chosen group.
        gating = 2 * d * model.num_groups + model.primary_k * 2 * d * model.experts_per_group
    else:
        experts, gating = model.k, 2 * d * model.num_experts
    return experts * 2 * d * h + gating


def ops_per_timestep(config):
    """Multiply-adds per token of the forward pass without the softmax, as
    the paper's ops/timestep: two LSTMs (4 gates over [input, state]) and
    the FFN block."""
    d = config.model.dim
    return 2 * 4 * (2 * d) * d + ffn_block_macs(config.model)


def train_flops_per_token(config, vocab_size):
    """FLOPs per token of a training step: 3 x the forward pass (forward,
    and a backward pass of twice its cost), 2 FLOPs per multiply-add,
    softmax included."""
    forward_macs = ops_per_timestep(config) + config.model.dim * vocab_size
    return 3 * 2 * forward_macs


def device_kind():
    try:
        import jax  # pylint: disable=g-import-not-at-top

        return jax.devices()[0].device_kind
    except Exception:  # pylint: disable=broad-except
        return "unknown"


def trainer_command(args, name, seed):
    command = [
        sys.executable, "-m", "trainers.lstm_moe", f"--config={CONFIG}:{name}",
        f"--workdir={os.path.join(args.runs_dir, f'{name}_s{seed}')}", f"--config.seed={seed}",
        f"--config.data.token_cache_dir={args.cache_dir}",
        f"--config.data.corpus={args.corpus}",
    ]
    if args.steps:
        command += [f"--config.train.steps={args.steps}",
                    f"--config.train.checkpoint_every={args.steps // 4}"]
    return command


def run_one(args, name, seed):
    """Trains (or resumes) one run; returns its record, or None if the
    trainer failed (its log is kept in the workdir)."""
    workdir = os.path.join(args.runs_dir, f"{name}_s{seed}")
    os.makedirs(workdir, exist_ok=True)
    command = trainer_command(args, name, seed)
    start = time.time()
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        print(f"{name} seed {seed}: the trainer failed (exit {code}); see {workdir}/log.txt",
              flush=True)
        return None
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return make_record(args, name, seed, summary, device_kind(), time.time() - start)


def make_record(args, name, seed, summary, device, wall_seconds):
    """The JSON record of a finished run from its trainer summary."""
    command = trainer_command(args, name, seed)
    config = lstm_moe_sweep.get_config(name)
    if args.steps:
        config.train.steps = args.steps
    vocab = config.data.vocab_size
    tokens_per_step = config.train.batch_size * config.data.sequence_length
    flops = train_flops_per_token(config, vocab)
    tokens_per_sec = summary["train_tokens_per_sec"]
    return {
        "name": name,
        "seed": seed,
        "corpus": args.corpus,
        "experts": 1 if config.model.get("dense_ffn_hidden_dim") else (
            config.model.num_groups * config.model.experts_per_group
            if config.model.hierarchical else config.model.num_experts),
        "hierarchical": bool(config.model.hierarchical),
        "dense_ffn_hidden_dim": config.model.get("dense_ffn_hidden_dim"),
        "ops_per_timestep": ops_per_timestep(config),
        "train_flops_per_token": flops,
        "train_tokens": config.train.steps * tokens_per_step,
        "steps": summary["steps"],
        "validation_perplexity": summary["validation_perplexity"],
        "test_perplexity": summary["test_perplexity"],
        "unigram_test_perplexity": summary["unigram_test_perplexity"],
        "total_parameters": summary["total_parameters"],
        "active_parameters_per_token": summary["active_parameters_per_token"],
        "train_tokens_per_sec": tokens_per_sec,
        "train_tflops_per_sec": None if tokens_per_sec is None else flops * tokens_per_sec / 1e12,
        "train_routing": summary.get("train_routing", {}),
        "test_routing": summary.get("test_routing", {}),
        "backend": summary["backend"],
        "device": device,
        "wall_seconds_this_call": wall_seconds,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(command[1:]),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", required=True, help="token cache of --corpus")
    parser.add_argument("--corpus", default="tf_moe_lm_en",
                        help="the corpus the cache was exported from (the trainer checks "
                             "it): tf_moe_lm_en or tf_moe_lm_en_large")
    parser.add_argument("--out", required=True, help="folder for <name>_s<seed>.json and runs/")
    parser.add_argument("--runs_dir", default=None,
                        help="workdirs (checkpoints, logs) of the runs; default <out>/runs")
    parser.add_argument("--runs", default=",".join(lstm_moe_sweep.NAMES),
                        help=f"comma-separated names of {lstm_moe_sweep.NAMES}")
    parser.add_argument("--seeds", default="0,1", help="seeds of the --seeded runs")
    parser.add_argument("--seeded", default="dense,moe64",
                        help="runs repeated over --seeds (the others: the first seed)")
    parser.add_argument("--steps", type=int, default=None,
                        help="override train.steps (a multiple of 4; smoke tests)")
    parser.add_argument("--records_from_runs", default=None, metavar="DEVICE_KIND",
                        help="train nothing: write the missing records of runs whose "
                             "summary.json is in --runs_dir (copied from the machine "
                             "that ran them, named here)")
    parser.add_argument("--time_budget_s", type=float, default=math.inf,
                        help="start no run after this many seconds")
    args = parser.parse_args(argv)
    args.runs_dir = args.runs_dir or os.path.join(args.out, "runs")
    args.runs = [r for r in args.runs.split(",") if r]
    for name in args.runs:
        if name not in lstm_moe_sweep.NAMES:
            parser.error(f"--runs: {name!r} is not one of {lstm_moe_sweep.NAMES}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    args.seeded = set(r for r in args.seeded.split(",") if r)
    if args.steps is not None and (args.steps < 4 or args.steps % 4):
        parser.error(f"--steps must be a positive multiple of 4. Received: --steps={args.steps}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    plan = [(name, seed) for name in args.runs
            for seed in (args.seeds if name in args.seeded else args.seeds[:1])]
    failed = []
    for name, seed in plan:
        path = os.path.join(args.out, f"{name}_s{seed}.json")
        if os.path.exists(path):
            print(f"{name} seed {seed}: done ({path})", flush=True)
            continue
        if args.records_from_runs:
            summary = os.path.join(args.runs_dir, f"{name}_s{seed}", "summary.json")
            if os.path.exists(summary):
                with open(summary) as f:
                    record = make_record(args, name, seed, json.load(f),
                                         args.records_from_runs, None)
                with open(path, "w") as f:
                    json.dump(record, f, indent=2)
                print(f"{name} seed {seed}: record written from {summary}", flush=True)
            continue
        if time.time() - start > args.time_budget_s:
            print(f"time budget spent; {name} seed {seed} and later runs wait", flush=True)
            break
        record = run_one(args, name, seed)
        if record is None:
            failed.append(f"{name}_s{seed}")
            continue
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"{name} seed {seed}: test perplexity {record['test_perplexity']:.2f}, "
              f"{record['train_tokens_per_sec'] / 1e3:.0f}k tokens/s, "
              f"{record['wall_seconds_this_call']:.0f} s", flush=True)
    if failed:
        print(f"failed: {failed}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
