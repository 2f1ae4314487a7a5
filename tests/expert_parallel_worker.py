"""The Transformer-MoE and data of the expert-parallel tests, and a worker
that trains it on an `ExpertParallel` mesh as one process of a multi-process
job (localhost coordinator), writing its losses as JSON.

    python tests/expert_parallel_worker.py --mesh batch:2,expert:4 \\
        --num_processes 2 --process_id 0 --devices 4 --port 12355 --out p0.json

Shape letters: B batch, L length, d model dim, E experts, h hidden dim.
"""

import argparse
import json
import os

import numpy as np

VOCAB, L, B, E, D, H = 32, 16, 16, 8, 16, 16
GROUP = 8  # tokens per routing group; each of 8 data shards holds 32
STEPS = 3


def model_config(dispatch, capacity_factor=1.25, **overrides):
    from configs import transformer_moe_base

    config = transformer_moe_base.get_config().model
    fields = dict(
        dim=D, num_heads=2, num_layers=2, ffn_hidden_dim=32, dropout=0.0,
        num_experts=E, k=2, expert_hidden_dim=H, expert_dropout=0.0,
        capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
        group_size=GROUP, dispatch=dispatch, z_loss_weight=1e-2,
    )
    config.update({**fields, **overrides})
    return config


def data(process_id=0, num_processes=1):
    """(x, y) of STEPS batches of B sequences; with several processes, this
    process's share of every batch (the rows its devices hold)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, size=(STEPS, B, L + 1)).astype("int32")
    share = B // num_processes
    tokens = tokens[:, process_id * share:(process_id + 1) * share].reshape(-1, L + 1)
    return tokens[:, :-1], tokens[:, 1:]


def build(config, weights=None, jit_compile="auto"):
    import keras

    from tf_moe.models import build_decoder_lm

    keras.utils.set_random_seed(0)
    model = build_decoder_lm(VOCAB, L, config)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    if weights is not None:
        model.set_weights(weights)
    return model


def fit(model, process_id=0, num_processes=1):
    """(losses of the STEPS steps, weights after them) as numpy."""
    x, y = data(process_id, num_processes)
    history = model.fit(x, y, batch_size=B // num_processes, epochs=STEPS, steps_per_epoch=1,
                        shuffle=False, verbose=0)
    return np.array(history.history["loss"]), [np.asarray(w) for w in model.weights]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default="batch:2,expert:4")
    parser.add_argument("--dispatch", default="custom_call")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--devices", type=int, default=8, help="CPU devices per process")
    parser.add_argument("--port", type=int, default=12355)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    from tf_moe import sharding

    if args.num_processes > 1:
        sharding.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    # Each process feeds its own share of every batch (numpy, not tf.data).
    keras.distribution.set_distribution(
        sharding.expert_parallel(args.mesh, auto_shard_dataset=args.num_processes == 1)
    )
    model = build(model_config(args.dispatch))
    losses, _ = fit(model, args.process_id, args.num_processes)
    with open(args.out, "w") as f:
        json.dump({"losses": losses.tolist(), "process_id": args.process_id}, f)


if __name__ == "__main__":
    main()
