"""The LSTM-MoE language model's training step under each dtype policy, side
by side in one process: tokens/s of `model.fit` steps (`train_on_batch`,
XLA) for float32 and mixed_bfloat16 (the LSTMs and softmax in float32, the
rest in bfloat16: `tf_moe.models.lstm_moe._lstm`). On a JAX GPU this is the
check that the mixed policy builds and trains at all (cuDNN's RNN lowering
rejects bfloat16 LSTMs).

Usage:
    KERAS_BACKEND=jax python benchmarks/lstm_moe_precision.py \
        [--experts 16] [--steps 30] [--json out.json]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import time_step  # noqa: E402
from configs import lstm_moe_tiny  # noqa: E402
from tf_moe.models import build_lstm_moe  # noqa: E402


def measure(policy, args):
    config = lstm_moe_tiny.get_config()
    m = config.model
    m.dim, m.expert_hidden_dim, m.num_experts, m.k = args.dim, args.dim, args.experts, args.k
    m.group_size = args.batch * args.length
    keras.config.set_dtype_policy(policy)  # what train.dtype_policy sets
    try:
        keras.utils.set_random_seed(0)
        model = build_lstm_moe(args.vocab, args.length, m)
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, args.vocab, (args.batch, args.length + 1)).astype("int32")
        x, y = tokens[:, :-1], tokens[:, 1:]
        losses = []
        median, best = time_step(lambda: losses.append(float(model.train_on_batch(x, y))),
                                 warmup=3, iters=args.steps)
    finally:
        keras.config.set_dtype_policy("float32")
    return {
        "policy": policy,
        "lstm_dtype": model.get_layer("lstm_1").compute_dtype,
        "moe_dtype": model.get_layer("moe").compute_dtype,
        "ms_per_step": 1e3 * median,
        "tokens_per_sec": args.batch * args.length / median,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": bool(np.isfinite(losses).all()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [measure(policy, args) for policy in ("float32", "mixed_bfloat16")]
    print(f"backend {keras.backend.backend()}; d={args.dim} V={args.vocab} "
          f"B={args.batch} L={args.length} E={args.experts} k={args.k}")
    header = ("policy", "lstm_dtype", "moe_dtype", "ms_per_step", "tokens_per_sec",
              "first_loss", "last_loss", "finite")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[h]:.2f}" if isinstance(row[h], float) else str(row[h])
                         for h in header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0 if all(row["finite"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
