"""A short demo: a MoE layer learns a task a dense layer of equal active width
cannot, inside `model.fit`, and reports its routing statistics.

Task: each token carries a one-hot task id (one of `num_tasks`) and a vector
x; the target is A_task x for a random linear map per task. A top-1 MoE can
give each task its own expert; a dense MLP with the hidden width of ONE expert
must share its units across all tasks.

Run: `python -m tf_moe.demo` (or `make train`).
"""

import time

import keras
import numpy as np
from absl import app, flags

import tf_moe

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_tasks", 8, "Random linear maps, and experts.")
flags.DEFINE_integer("dim", 16, "Size of x and of the targets.")
flags.DEFINE_integer("hidden", 32, "Hidden width of one expert and of the dense MLP.")
flags.DEFINE_integer("epochs", 6, "Training epochs.")
flags.DEFINE_integer("examples", 8192, "Training examples.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def make_task(num_tasks, dim, examples, seed):
    """(inputs [N, num_tasks + dim], targets [N, dim])."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(0, 1 / np.sqrt(dim), (num_tasks, dim, dim)).astype("float32")
    task = rng.integers(0, num_tasks, examples)
    x = rng.normal(size=(examples, dim)).astype("float32")
    targets = np.einsum("nd,nde->ne", x, maps[task])
    inputs = np.concatenate([np.eye(num_tasks, dtype="float32")[task], x], axis=1)
    return inputs, targets


def build_model(kind, num_tasks, dim, hidden):
    inputs = keras.Input((num_tasks + dim,))
    h = keras.layers.Dense(64, name="embed")(inputs)
    if kind == "moe":
        h = h + tf_moe.layers.MoE(
            num_experts=num_tasks,
            expert_hidden_dim=hidden,
            router=tf_moe.routing.TopKRouter(k=1),
            capacity_factor=2.0,
            group_size=256,
            name="moe",
        )(h)
    else:
        h = h + keras.layers.Dense(64, name="ffn_out")(
            keras.layers.Dense(hidden, activation="relu", name="ffn_in")(h)
        )
    model = keras.Model(inputs, keras.layers.Dense(dim, name="head")(h))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    return model


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    inputs, targets = make_task(FLAGS.num_tasks, FLAGS.dim, FLAGS.examples, FLAGS.seed)
    val_inputs, val_targets = make_task(FLAGS.num_tasks, FLAGS.dim, 2048, FLAGS.seed)
    print(f"backend: {keras.backend.backend()}; task: {FLAGS.num_tasks} random "
          f"linear maps of dim {FLAGS.dim}, selected by a one-hot task id")
    results = {}
    for kind in ("dense", "moe"):
        model = build_model(kind, FLAGS.num_tasks, FLAGS.dim, FLAGS.hidden)
        callbacks = [tf_moe.metrics.RoutingStatsLogger()] if kind == "moe" else []
        print(f"\n== {kind} ==")
        start = time.time()
        model.fit(inputs, targets, batch_size=256, epochs=FLAGS.epochs,
                  validation_data=(val_inputs, val_targets), callbacks=callbacks,
                  verbose=2)
        loss = model.evaluate(val_inputs, val_targets, verbose=0)
        results[kind] = (loss, time.time() - start)
        if kind == "moe":
            stats = model.get_layer("moe").last_routing_stats
            print("routing stats (last validation batch):")
            for name, value in stats.items():
                print(f"  {name}: {np.round(value, 3)}")
    print("\nvalidation MSE (mean target variance is 1.0):")
    for kind, (loss, seconds) in results.items():
        print(f"  {kind:5s} {loss:.4f}  ({seconds:.1f} s)")


if __name__ == "__main__":
    app.run(main)
