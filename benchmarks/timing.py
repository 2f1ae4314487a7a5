"""The step timer every benchmark uses, the TensorFlow gradient step they
time, and the CUDA handler options of their variant rows (no tf_moe import,
so that a script can time other libraries with it in their own
environment)."""

import statistics
import time


def time_step(run, warmup, iters):
    """(median, min) seconds of `run()` over `iters` calls after `warmup`."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def tf_grad_step(model, x, cotangent):
    """A no-argument callable running one `jit_compile=True` forward+backward
    step of `model` (TensorFlow): the gradients of <model(x), cotangent> plus
    its `add_loss` losses w.r.t. x and every trainable weight."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * cotangent)
            if model.losses:
                loss += tf.add_n(model.losses)
        return tape.gradient(loss, [x] + model.trainable_variables)

    def run():
        for g in grad(x):
            if g is not None:
                g.numpy()  # synchronize

    return run


# Variant-row options -> the environment variable the CUDA handlers read.
CUDA_OPTIONS = {
    "cutlass": "TF_MOE_GROUPED_GEMM", "streams": "TF_MOE_GROUPED_GEMM",
    "grouped": "TF_MOE_GROUPED_GEMM",
    "cooperative": "TF_MOE_CUTLASS_SCHEDULE", "pingpong": "TF_MOE_CUTLASS_SCHEDULE",
    # The cooperative kernel's CTA cluster (2x1 for long segments, auto).
    "1x2": "TF_MOE_CUTLASS_CLUSTER", "2x1": "TF_MOE_CUTLASS_CLUSTER",
    "auto": "TF_MOE_CUTLASS_CLUSTER",
    "sync": "TF_MOE_CHECK_ROUTING", "deferred": "TF_MOE_CHECK_ROUTING",
    # The CUTLASS tile scheduler's raster order and swizzle band (tuning).
    **{f"{order}{band}": "TF_MOE_CUTLASS_RASTER" for order in "mn" for band in (1, 2, 4, 8)},
}


def cuda_options_env(options):
    """"cutlass+pingpong+deferred" -> {TF_MOE_GROUPED_GEMM: "cutlass",
    TF_MOE_CUTLASS_SCHEDULE: "pingpong", TF_MOE_CHECK_ROUTING: "deferred"}."""
    env = {}
    for option in filter(None, options.split("+")):
        if option not in CUDA_OPTIONS:
            raise ValueError(f"a row's options must be among {sorted(CUDA_OPTIONS)}. "
                             f"Received: {option!r} in {options!r}")
        env[CUDA_OPTIONS[option]] = option
    return env
