"""Where the MoE layer's forward+backward time goes (Keras-on-JAX).

Times, each as its own jitted forward+backward step at one size:
    router      routing (gate, top-k, positions, aux losses) from x
    experts     the batched expert FFN on an [E, G, C, d] buffer
    <path>      dispatch + combine of `path` (einsum / gather / custom_call)
                with a fixed routing
    layer       the whole MoE layer with dispatch=<path>
    dense       the equal-FLOP dense FFN

Usage:
    KERAS_BACKEND=jax python benchmarks/moe_breakdown.py [--json out.json]
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_moe  # noqa: E402
from tf_moe.ops import dispatch as dispatch_lib  # noqa: E402
from timing import time_step  # noqa: E402  (benchmarks/ is sys.path[0])


def timed(fn, *args, warmup=3, iters=20):
    """Median ms of jit(fn)(*args), with moe_layer.py's timer."""
    fn = jax.jit(fn)
    return time_step(lambda: jax.block_until_ready(fn(*args)), warmup, iters)[0] * 1e3


def stateless_grad(layer, x, cotangent):
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    return lambda t, x: jax.grad(loss, argnums=(0, 1))(t, x), (trainable, x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--h", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--group_size", type=int, default=1024)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    t, d, h, e, k = args.tokens, args.d, args.h, args.experts, args.k
    dtype = args.dtype
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)
    cot = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    results = {"config": vars(args), "device": str(jax.devices()[0])}

    keras.utils.set_random_seed(0)
    moe = tf_moe.layers.MoE(
        num_experts=e, expert_hidden_dim=h, router=tf_moe.routing.TopKRouter(k=k),
        capacity_factor=args.capacity_factor, group_size=args.group_size, dtype=dtype,
    )
    moe.build((t, d))
    groups = x.reshape(-1, args.group_size, d)
    capacity = moe.capacity(args.group_size, True)
    results["capacity"] = capacity

    # Router alone (fwd+bwd through combine_weight into the gate kernel).
    router = moe.router
    kernel = router.kernel.value

    def router_loss(kernel, groups):
        r = router._route(groups.astype(jnp.float32),
                          jnp.einsum("gsd,de->gse", groups.astype(jnp.float32), kernel),
                          capacity, jnp.ones(groups.shape[:2], bool), True)
        return jnp.sum(r.combine_weight) + sum(r.aux_losses.values())

    results["router_ms"] = timed(jax.grad(router_loss, argnums=(0, 1)), kernel, groups)

    # Experts alone on a full buffer.
    buffer = jnp.asarray(rng.normal(size=(e, groups.shape[0], capacity, d)), dtype)
    grad, fargs = stateless_grad(moe.experts, buffer, jnp.ones(buffer.shape, jnp.float32))
    results["experts_ms"] = timed(grad, *fargs)

    # Dispatch + combine alone, per path, with a fixed routing.
    routing = router.route(groups, capacity, training=True)
    cot_g = cot.reshape(groups.shape)
    for path in ("einsum", "gather", "custom_call"):
        dispatch, combine = dispatch_lib.DISPATCHERS[path]

        def dc_loss(groups, weight, path=path, dispatch=dispatch, combine=combine):
            r = routing._replace(combine_weight=weight)
            y = combine(dispatch(groups, r) * 2, r)
            return jnp.sum(y.astype(jnp.float32) * cot_g)

        results[f"{path}_dispatch_combine_ms"] = timed(
            jax.grad(dc_loss, argnums=(0, 1)), groups, routing.combine_weight
        )

    # Whole layers.
    for path in ("einsum", "gather", "custom_call"):
        keras.utils.set_random_seed(0)
        layer = tf_moe.layers.MoE(
            num_experts=e, expert_hidden_dim=h, router=tf_moe.routing.TopKRouter(k=k),
            capacity_factor=args.capacity_factor, group_size=args.group_size,
            dispatch=path, dtype=dtype,
        )
        layer.build((t, d))
        grad, fargs = stateless_grad(layer, x, cot)
        results[f"layer_{path}_ms"] = timed(grad, *fargs)
    dense = keras.Sequential([keras.layers.Dense(k * h, activation="relu", dtype=dtype),
                              keras.layers.Dense(d, dtype=dtype)])
    dense.build((t, d))
    grad, fargs = stateless_grad(dense, x, cot)
    results["dense_ms"] = timed(grad, *fargs)
    # Variants of the expert matmuls alone (no bias/activation), fwd+bwd.
    g, c = groups.shape[0], capacity
    wi = jnp.asarray(rng.normal(size=(e, d, h)) * 0.02, dtype)
    wo = jnp.asarray(rng.normal(size=(e, h, d)) * 0.02, dtype)

    def ffn_einsum(wi, wo, buf):
        hidden = jax.nn.relu(jnp.einsum("egcd,edh->egch", buf, wi))
        return jnp.sum(jnp.einsum("egch,ehd->egcd", hidden, wo).astype(jnp.float32))

    def ffn_flat(wi, wo, buf):
        flat = buf.reshape(e, g * c, d)  # [E, G * C, d]
        hidden = jax.nn.relu(jnp.einsum("etd,edh->eth", flat, wi))
        return jnp.sum(jnp.einsum("eth,ehd->etd", hidden, wo).astype(jnp.float32))

    def ffn_f32_acc(wi, wo, buf):
        flat = buf.reshape(e, g * c, d)
        hidden = jnp.einsum("etd,edh->eth", flat, wi, preferred_element_type=jnp.float32)
        hidden = jax.nn.relu(hidden).astype(dtype)
        out = jnp.einsum("eth,ehd->etd", hidden, wo, preferred_element_type=jnp.float32)
        return jnp.sum(out)

    tokens_padded = e * g * c
    w1 = jnp.asarray(rng.normal(size=(d, h)) * 0.02, dtype)
    w2 = jnp.asarray(rng.normal(size=(h, d)) * 0.02, dtype)
    xs = jnp.asarray(rng.normal(size=(tokens_padded, d)), dtype)

    def dense_same_rows(w1, w2, xs):  # one FFN of width h on all E*G*C rows
        hidden = jax.nn.relu(xs @ w1)
        return jnp.sum((hidden @ w2).astype(jnp.float32))

    for name, fn, fargs in (
        ("experts_einsum_egcd_ms", ffn_einsum, (wi, wo, buffer)),
        ("experts_einsum_flat_ms", ffn_flat, (wi, wo, buffer)),
        ("experts_flat_f32acc_ms", ffn_f32_acc, (wi, wo, buffer)),
        ("dense_same_rows_ms", dense_same_rows, (w1, w2, xs)),
    ):
        results[name] = timed(jax.grad(fn, argnums=(0, 1, 2)), *fargs)
    results["useful_tflops_per_ms"] = 12.0 * t * k * d * h / 1e12 * 1e3
    for key, value in results.items():
        print(f"{key:>32}: {value:.3f}" if isinstance(value, float) else f"{key:>32}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
