"""The step timer every benchmark uses (no tf_moe import, so that a script can
time other libraries with it in their own environment)."""

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
