"""Times `model.fit` steps of the tiny Transformer-MoE LM with and without
XLA (`jit_compile`), with and without its MoE blocks, and of a model holding
one MoE layer: the measurement behind the open "TF CPU XLA step" problem in
docs/status.md. `--cases=dropout` times only the cause found: dropout's
random numbers under XLA on TF CPU (Keras's `keras.random.dropout`, which
leaves TensorFlow's RNG algorithm on "auto_select", against
`tf_moe.layers.dropout`, which names "philox"). Prints a table and
writes JSON.

    KERAS_BACKEND=tensorflow python benchmarks/xla_step.py --json /tmp/xla_step.json
    KERAS_BACKEND=tensorflow python benchmarks/xla_step.py --cases=dropout --json /tmp/xla_dropout.json
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

# The repository root, for `configs` (not an installed package).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import transformer_moe_tiny_lm, transformer_moe_tiny_translate  # noqa: E402
from tf_moe import layers, models, routing  # noqa: E402

VOCAB, LENGTH, BATCH, STEPS = 8000, 64, 32, 6


def step_ms(model, inputs, targets, jit_compile):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if targets.dtype.kind == "i" else "mse",
        jit_compile=jit_compile,
    )
    model.fit(inputs, targets, batch_size=BATCH, epochs=1, verbose=0, steps_per_epoch=2)
    start = time.perf_counter()
    model.fit(inputs, targets, batch_size=BATCH, epochs=1, verbose=0)
    return (time.perf_counter() - start) / (len(targets) // BATCH) * 1e3


def transformer(moe_every, dispatch):
    config = transformer_moe_tiny_lm.get_config().model
    config.moe_every, config.dispatch = moe_every, dispatch
    return models.build_decoder_lm(VOCAB, LENGTH, config)


def translation():
    """The tiny translation config's encoder-decoder (2 + 2 blocks, MoE in every other)."""
    config = transformer_moe_tiny_translate.get_config().model
    return models.build_encoder_decoder(VOCAB, LENGTH, config, pad_id=0)


def moe_only(dispatch):
    inputs = keras.Input((LENGTH, 128))
    moe = layers.MoE(8, 512, router=routing.TopKRouter(k=2), dispatch=dispatch, group_size=1024)
    return keras.Model(inputs, moe(inputs))


def dropout_ms(fn, jit_compile, repeats=3):
    import tensorflow as tf  # only the dropout cases, which are TF's RNG

    step = tf.function(fn, jit_compile=jit_compile)
    step().numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        step().numpy()
    return (time.perf_counter() - start) / repeats * 1e3


def dropout_cases():
    """The expert dropout's shape in the tiny LM's MoE blocks: [E, C, h]."""
    import tensorflow as tf

    from tf_moe.layers import dropout as dropout_lib

    x = tf.ones((8, 640, 512))  # [E, C, h]
    # SeedGenerators: seeds XLA cannot fold, as in a train step.
    keras_seed, philox_seed = keras.random.SeedGenerator(0), keras.random.SeedGenerator(0)
    keras_dropout = lambda: keras.random.dropout(x, 0.1, seed=keras_seed)  # noqa: E731
    philox_dropout = lambda: dropout_lib.dropout(x, 0.1, philox_seed)  # noqa: E731
    return [
        ("keras.random.dropout [8,640,512]", keras_dropout, False),
        ("keras.random.dropout [8,640,512]", keras_dropout, True),
        ("tf_moe dropout (philox)", philox_dropout, False),
        ("tf_moe dropout (philox)", philox_dropout, True),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="xla_step.json")
    parser.add_argument("--cases", choices=("all", "models", "dropout"), default="all",
                        help="the model steps, the dropout cases, or both")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help="timed steps per model (after 2 untimed)")
    parser.add_argument("--models", default=None,
                        help="comma-separated substrings: only the model rows whose "
                             "name contains one (e.g. gather,translation)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, VOCAB, (BATCH * args.steps, LENGTH))
    floats = rng.normal(size=(BATCH * args.steps, LENGTH, 128)).astype("float32")
    pairs = {"source": tokens, "target_in": tokens}
    cases = [
        ("transformer, MoE blocks, gather", lambda: transformer(2, "gather"), tokens, False),
        ("transformer, MoE blocks, gather", lambda: transformer(2, "gather"), tokens, True),
        ("transformer, MoE blocks, einsum", lambda: transformer(2, "einsum"), tokens, True),
        ("transformer, no MoE block", lambda: transformer(100, "gather"), tokens, True),
        ("one MoE layer, gather", lambda: moe_only("gather"), floats, True),
        ("translation, MoE blocks", translation, pairs, False),
        ("translation, MoE blocks", translation, pairs, True),
    ]
    if args.models:
        cases = [c for c in cases if any(m in c[0] for m in args.models.split(","))]
    rows = []
    if args.cases != "dropout":
        for name, build, data, jit in cases:
            keras.utils.set_random_seed(0)
            targets = tokens if isinstance(data, dict) else data
            rows.append({"model": name, "jit_compile": jit,
                         "ms_per_step": step_ms(build(), data, targets, jit)})
            print(f"{name:34s} jit_compile={str(jit):5s} {rows[-1]['ms_per_step']:8.0f} ms/step",
                  flush=True)
    if args.cases != "models" and keras.backend.backend() == "tensorflow":
        for name, fn, jit in dropout_cases():
            rows.append({"model": name, "jit_compile": jit, "ms_per_step": dropout_ms(fn, jit)})
            print(f"{name:34s} jit_compile={str(jit):5s} {rows[-1]['ms_per_step']:8.1f} ms/call",
                  flush=True)
    with open(args.json, "w") as f:
        json.dump({"backend": keras.backend.backend(), "steps": args.steps,
                   "machine": f"{os.cpu_count()} cores, load average "
                              f"{os.getloadavg()[0]:.1f} at the end",
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
