"""Times `model.fit` steps of the tiny Transformer-MoE LM with and without
XLA (`jit_compile`), with and without its MoE blocks, and of a model holding
one MoE layer: the measurement behind the open "TF CPU XLA step" problem in
docs/status.md. Prints a table and writes JSON.

    KERAS_BACKEND=tensorflow python benchmarks/xla_step.py --json /tmp/xla_step.json
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

from configs import transformer_moe_tiny_lm  # noqa: E402
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
    return (time.perf_counter() - start) / (len(inputs) // BATCH) * 1e3


def transformer(moe_every, dispatch):
    config = transformer_moe_tiny_lm.get_config().model
    config.moe_every, config.dispatch = moe_every, dispatch
    return models.build_decoder_lm(VOCAB, LENGTH, config)


def moe_only(dispatch):
    inputs = keras.Input((LENGTH, 128))
    moe = layers.MoE(8, 512, router=routing.TopKRouter(k=2), dispatch=dispatch, group_size=1024)
    return keras.Model(inputs, moe(inputs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="xla_step.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, VOCAB, (BATCH * STEPS, LENGTH))
    floats = rng.normal(size=(BATCH * STEPS, LENGTH, 128)).astype("float32")
    cases = [
        ("transformer, MoE blocks, gather", lambda: transformer(2, "gather"), tokens, False),
        ("transformer, MoE blocks, gather", lambda: transformer(2, "gather"), tokens, True),
        ("transformer, MoE blocks, einsum", lambda: transformer(2, "einsum"), tokens, True),
        ("transformer, no MoE block", lambda: transformer(100, "gather"), tokens, True),
        ("one MoE layer, gather", lambda: moe_only("gather"), floats, True),
    ]
    rows = []
    for name, build, data, jit in cases:
        keras.utils.set_random_seed(0)
        rows.append({"model": name, "jit_compile": jit,
                     "ms_per_step": step_ms(build(), data, data, jit)})
        print(f"{name:34s} jit_compile={str(jit):5s} {rows[-1]['ms_per_step']:8.0f} ms/step",
              flush=True)
    with open(args.json, "w") as f:
        json.dump({"backend": keras.backend.backend(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
