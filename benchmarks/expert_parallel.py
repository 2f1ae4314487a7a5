"""Expert parallelism per mesh shape: step time, bytes moved by collectives
and parameter bytes per device, for each dispatch path (JAX).

One jitted forward+backward step of a Transformer-MoE LM
(`tf_moe.models.build_decoder_lm`, every other block an MoE) on an
`ExpertParallel` mesh (`tf_moe.sharding`), from the compiled HLO:
- collective bytes: the result sizes of the step's all-to-all, all-gather,
  all-reduce and collective-permute ops, per device (the shapes in the
  partitioned program are a device's);
- parameter bytes per device: the addressable shard of every weight.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \\
        python benchmarks/expert_parallel.py --json results.json

On 8 virtual CPU devices of a 2-core machine the step times measure the
programs' overhead, not scaling (the devices share two cores); the bytes and
layouts are those a real mesh runs. Prints a table and writes JSON.
"""

import argparse
import datetime
import json
import os
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from configs import transformer_moe_base  # noqa: E402
from tf_moe import sharding  # noqa: E402
from tf_moe.models import build_decoder_lm  # noqa: E402
from timing import time_step  # noqa: E402

MESHES = ("batch:8", "batch:4,expert:2", "batch:2,expert:4", "expert:8",
          "batch:2,expert:2,model:2")
PATHS = ("einsum", "gather", "custom_call", "dropless")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def collective_bytes(hlo):
    """{op: bytes} summed over the collectives of compiled HLO text."""
    totals = {}
    for line in hlo.splitlines():
        match = re.search(
            r" = (.+?) (all-to-all|all-gather|all-reduce|collective-permute)(-start)?\(", line
        )
        if not match:
            continue
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            size += _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
        totals[match.group(2)] = totals.get(match.group(2), 0) + size
    return totals


def model_config(args, path):
    config = transformer_moe_base.get_config().model
    config.update(
        dim=args.dim, num_heads=4, num_layers=2, ffn_hidden_dim=2 * args.hidden, dropout=0.0,
        num_experts=args.experts, k=2, expert_hidden_dim=args.hidden, expert_dropout=0.0,
        capacity_factor=None if path == "dropless" else 1.25, eval_capacity_factor=1.25,
        group_size=args.group_size, dispatch="custom_call" if path == "dropless" else path,
    )
    return config


def bench(args, mesh, path):
    distribution = sharding.expert_parallel(mesh)
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(0)
    model = build_decoder_lm(args.vocab, args.length, model_config(args, path))
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.length))
    x = jax.device_put(tokens.astype("int32"),
                       distribution.get_data_layout(tokens.shape).backend_layout)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, x):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return (logits.astype("float32") ** 2).mean()

    step = jax.jit(jax.grad(loss))
    hlo = step.lower(trainable, x).compile().as_text()
    median, best = time_step(lambda: jax.block_until_ready(step(trainable, x)),
                             args.warmup, args.iters)
    params = sum(v.value.addressable_shards[0].data.nbytes for v in model.trainable_variables)
    total = sum(v.value.nbytes for v in model.trainable_variables)
    keras.distribution.set_distribution(None)
    return {
        "mesh": mesh, "path": path, "ms": median * 1e3, "best_ms": best * 1e3,
        "collective_bytes": collective_bytes(hlo),
        "param_bytes_per_device": int(params), "param_bytes_total": int(total),
        "tokens": args.batch * args.length,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meshes", default=";".join(MESHES),
                        help="';'-separated meshes")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--group_size", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default="expert_parallel_benchmark.json")
    args = parser.parse_args()
    rows = []
    header = (f"{'mesh':>26} {'path':>12} {'ms':>8} {'all-to-all MB':>14} {'all-gather MB':>14} "
              f"{'all-reduce MB':>14} {'params MB/device':>17}")
    print(f"{len(jax.devices())} devices: {jax.devices()[0].device_kind}\n{header}")
    for mesh in args.meshes.split(";"):
        for path in args.paths.split(","):
            row = bench(args, mesh, path)
            rows.append(row)
            c = row["collective_bytes"]
            print(f"{mesh:>26} {path:>12} {row['ms']:8.1f} "
                  f"{c.get('all-to-all', 0) / 1e6:14.3f} {c.get('all-gather', 0) / 1e6:14.3f} "
                  f"{c.get('all-reduce', 0) / 1e6:14.3f} "
                  f"{row['param_bytes_per_device'] / 1e6:17.3f}", flush=True)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
        "keras": keras.__version__, "args": vars(args),
        "load_average": os.getloadavg(),
    }
    with open(args.json, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
