"""GPU correctness of the custom-call path: the CUDA FFI handlers against the
einsum path, on Keras-on-JAX (CI has no GPU: run this on a GPU machine).

For each dtype and each routing case (real routers' output: top-1, top-2,
top-4 with batch-prioritized routing, tied logits, everything to one expert,
capacity 1, k = E), compares under jax.jit:

    dispatch(x), combine(y), d dispatch / dx, d combine / dy,
    d combine / d combine_weight (on routed choices; exactly 0 elsewhere),

and prints ||custom - einsum|| / ||einsum|| per quantity. Then checks that an
out-of-range position raises (also with d = 0, where no data moves)
(XlaRuntimeError / JaxRuntimeError) instead of writing out of bounds, and
that with TF_MOE_CHECK_ROUTING=deferred the call returns and the next one
raises, once.

Dropless mode: the CUDA grouped matmul, both the Hopper CUTLASS kernel
(bfloat16, float16) and the cuBLAS GEMMs, against a float64 numpy
per-segment reference (output, d rows, d kernel; random, skewed and tiny
segments, empty experts, one expert for all rows, an unused tail, the
transposed kernel; the tail and empty experts' d kernel exactly 0), the
same for `grouped_matmul_bias` (bias, and bias + relu, fused into the
GEMM's epilogue; also d bias), bad
`group_sizes` raising (deferred to the next call on the CUTLASS kernel), and a dropless `MoE` (custom_call, capacity_factor=None) against the
gather `MoE` with C = S (outputs and gradients of a training step).
Exit status 1 on any failure.

Usage:
    KERAS_BACKEND=jax TF_MOE_OPS_DIR=<dir with libtf_moe_ffi_cuda.so> \
        python benchmarks/gpu_correctness.py [--json out.json]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from timing import CUDA_OPTIONS, cuda_options_env  # noqa: E402  (benchmarks/ is sys.path[0])
from tf_moe.ops import custom_call  # noqa: E402
from tf_moe.ops import dispatch as dispatch_lib  # noqa: E402
from tf_moe.ops import dropless  # noqa: E402
from tf_moe.ops import grouped_matmul as grouped_matmul_lib  # noqa: E402
from tf_moe.ops.plan import resolve_plan  # noqa: E402
from tf_moe.routing import TopKRouter  # noqa: E402

# Relative-norm tolerance per dtype (einsum rounds combine weights to the
# dtype; the custom call accumulates in float32).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}
EPSILON = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}  # unit roundoff

# name: (router kwargs, G, S, d, E, C, kernel bias on expert 0)
CASES = {
    "top1": (dict(k=1), 4, 256, 256, 8, 40, 0.0),
    "top2": (dict(k=2), 4, 256, 512, 16, 40, 0.0),
    "top4_bpr": (dict(k=4, batch_prioritized_routing=True), 2, 128, 1024, 8, 64, 0.0),
    "tied_logits": (dict(k=2, kernel_initializer="zeros"), 3, 64, 128, 4, 20, 0.0),
    "one_expert": (dict(k=1), 2, 64, 64, 4, 64, 100.0),
    "capacity_1": (dict(k=2), 8, 32, 96, 8, 1, 0.0),
    "k_equals_e": (dict(k=4), 2, 32, 40, 4, 32, 0.0),
    "odd_d": (dict(k=2), 2, 48, 37, 6, 20, 0.0),
}


def make_routing(router_kwargs, groups, group_size, d, num_experts, capacity, bias, seed):
    router = TopKRouter(num_experts=num_experts, **router_kwargs)
    x = keras.random.normal((groups, group_size, d), seed=seed)
    router.build(x.shape)
    if bias:
        kernel = np.zeros(router.kernel.shape, np.float32)
        router.kernel.assign(kernel)
        # Every token's logit for expert 0 is `bias` higher.
        x = x.at[..., 0].set(1.0)
        kernel[0, 0] = bias
        router.kernel.assign(kernel)
    return router.route(x, capacity=capacity, training=True)


def paths_functions(path, routing):
    dispatch, combine = dispatch_lib.DISPATCHERS[path]

    def run(x, y, weight, cot_e, cot_t):
        r = routing._replace(combine_weight=weight)
        ex, vjp_d = jax.vjp(lambda x: dispatch(x, r), x)
        (dx,) = vjp_d(cot_e.astype(ex.dtype))
        out, vjp_c = jax.vjp(
            lambda y, w: combine(y, routing._replace(combine_weight=w)), y, weight
        )
        dy, dw = vjp_c(cot_t.astype(out.dtype))
        return dict(dispatch=ex, combine=out, grad_x=dx, grad_y=dy, grad_weight=dw)

    return jax.jit(run)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_case(name, dtype, seed):
    router_kwargs, groups, group_size, d, num_experts, capacity, bias = CASES[name]
    routing = make_routing(router_kwargs, groups, group_size, d, num_experts, capacity,
                           bias, seed)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(groups, group_size, d)), dtype)
    y = jnp.asarray(rng.normal(size=(num_experts, groups, capacity, d)), dtype)
    cot_e = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    cot_t = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    weight = routing.combine_weight
    got = paths_functions("custom_call", routing)(x, y, weight, cot_e, cot_t)
    # Full float32 matmuls for the reference: on GPUs the default precision
    # runs float32 einsums in TF32 (~2e-4 relative error).
    with jax.default_matmul_precision("highest"):
        want = paths_functions("einsum", routing)(x, y, weight, cot_e, cot_t)
    mask = np.asarray(routing.dispatch_mask)
    row = {"case": name, "dtype": dtype, "routed": int(mask.sum()), "choices": mask.size}
    ok = True
    for key in ("dispatch", "combine", "grad_x", "grad_y", "grad_weight"):
        a = np.asarray(got[key].astype(jnp.float32))
        b = np.asarray(want[key].astype(jnp.float32))
        if key == "grad_weight":
            ok &= bool((a[~mask] == 0).all())
            a, b = a * mask, b * mask
        ok &= bool(np.isfinite(a).all())
        row[key] = rel(a, b)
        ok &= row[key] <= TOLERANCE[dtype]
    row["ok"] = ok
    return row


def _error(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - reporting the type
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return None


def check_out_of_range():
    """A bad position raises an error on the GPU path (and nothing crashes)."""
    routing = make_routing(dict(k=2), 2, 16, 32, 4, 8, 0.0, seed=0)
    mask = np.asarray(routing.dispatch_mask)
    g, s, j = [int(v[0]) for v in np.nonzero(mask)]
    results = {}
    for field, value in (("position", 8), ("position", -1), ("expert_index", 4)):
        bad = np.asarray(getattr(routing, field)).copy()
        bad[g, s, j] = value
        r = routing._replace(**{field: jnp.asarray(bad)})
        # d = 0: no data moves (the copy kernels do not run), the routing is
        # checked all the same.
        for op, d in (("dispatch", 32), ("combine", 32), ("dispatch", 0), ("combine", 0)):
            fn = dispatch_lib.DISPATCHERS["custom_call"][0 if op == "dispatch" else 1]
            arg = jnp.ones((2, 16, d)) if op == "dispatch" else jnp.ones((4, 2, 8, d))
            key = f"{op} d={d} {field}={value}"
            try:
                jax.block_until_ready(jax.jit(lambda a: fn(a, r))(arg))
                results[key] = "NO ERROR (bad)"
            except Exception as error:  # noqa: BLE001 - reporting the type
                message = str(error).splitlines()[0][:120]
                results[key] = f"{type(error).__name__}: {message}"
    # TF_MOE_CHECK_ROUTING=deferred: the bad call returns (its bad choice
    # skipped), the next call on the device raises, once.
    os.environ["TF_MOE_CHECK_ROUTING"] = "deferred"
    bad = np.asarray(routing.position).copy()
    bad[g, s, j] = 8
    bad_routing = routing._replace(position=jnp.asarray(bad))
    dispatch_fn = dispatch_lib.DISPATCHERS["custom_call"][0]
    x = jnp.ones((2, 16, 32))
    key = "dispatch position=8, TF_MOE_CHECK_ROUTING=deferred"
    try:
        jax.block_until_ready(jax.jit(lambda a: dispatch_fn(a, bad_routing))(x))
        good = jax.jit(lambda a: dispatch_fn(a, routing))
        first = _error(lambda: jax.block_until_ready(good(x)))
        second = _error(lambda: jax.block_until_ready(good(x)))
        if first is None or "earlier" not in first or second is not None:
            results[key] = f"NO ERROR (bad): next call {first!r}, the one after {second!r}"
        else:
            results[key] = f"no error, then the next call: {first}"
    except Exception as error:  # noqa: BLE001 - the deferred mode did not run
        results[key] = f"UNEXPECTED: raised at the call: {str(error).splitlines()[0][:100]}"
    os.environ.pop("TF_MOE_CHECK_ROUTING")
    # The device is still usable afterwards.
    results["after errors, 1 + 1 ="] = float(jax.jit(lambda a: a + 1)(jnp.ones(())))
    return results


_rng = np.random.default_rng(123)
# name: (group sizes, unused tail rows, a, b). a and b are multiples of 8
# (the CUTLASS kernel's condition) except in odd_dims (cuBLAS only).
GROUPED_CASES = {
    "random": ([37, 0, 120, 5, 64, 1, 0, 29], 0, 256, 384),
    "tail": ([16, 16, 0, 40], 23, 128, 96),
    "one_expert": ([0, 0, 300, 0], 0, 64, 200),
    "odd_dims": ([3, 7, 11], 5, 37, 45),
    # Zipf-like load over 64 experts, as a badly balanced router gives.
    "skewed": ([int(v) for v in np.minimum(_rng.zipf(1.6, 64), 3000)], 0, 512, 1024),
    # 256 experts, most of them empty or tiny, and a tail.
    "many_experts": ([int(v) for v in _rng.integers(0, 40, 256) * (_rng.random(256) < 0.4)],
                     17, 128, 256),
    # Segments just under/over the 128-row tile, and widths off the 256 tile.
    "partial_tiles": ([1, 127, 129, 255, 257, 0, 3], 0, 136, 200),
}
# TF_MOE_GROUPED_GEMM values checked: the Hopper kernel (16-bit types only)
# in each configuration built (cooperative with either CTA cluster,
# TF_MOE_CUTLASS_CLUSTER; ping-pong, TF_MOE_CUTLASS_SCHEDULE) and the cuBLAS
# per-expert GEMMs.
GEMMS = {"float32": ("streams",),
         "bfloat16": ("cutlass", "cutlass+2x1", "cutlass+pingpong", "streams"),
         "float16": ("cutlass", "cutlass+2x1", "cutlass+pingpong", "streams")}
ALL_GEMMS = ("cutlass", "cutlass+2x1", "cutlass+pingpong", "streams")
# What a grouped-matmul row's options may set (the dispatch section sets
# TF_MOE_CHECK_ROUTING itself).
_GEMM_VARIABLES = sorted(set(CUDA_OPTIONS.values()) - {"TF_MOE_CHECK_ROUTING"})


def use_gemm(gemm):
    """Sets the handlers' variables (read per call) from a row's options:
    "cutlass+pingpong" -> TF_MOE_GROUPED_GEMM=cutlass,
    TF_MOE_CUTLASS_SCHEDULE=pingpong (benchmarks/timing.py); None unsets
    them."""
    for name in _GEMM_VARIABLES:
        os.environ.pop(name, None)
    if gemm is not None:
        os.environ.update(cuda_options_env(gemm))


def layout_of(sizes, tail):
    """A tile-1 `DroplessLayout` with the given segment sizes and tail."""
    sizes = np.asarray(sizes, np.int32)
    expert = np.concatenate([np.repeat(np.arange(len(sizes)), sizes),
                             np.full(tail, len(sizes))]).astype(np.int32)
    n = len(expert)
    return dropless.DroplessLayout(
        row=None, group_sizes=jnp.asarray(sizes), tile_expert=jnp.asarray(expert),
        row_owner=None, num_rows=n, tile=1)


# The forward products checked: the plain grouped matmul, and
# grouped_matmul_bias (bias, and relu, in the GEMM's epilogue).
FUSIONS = ("plain", "bias", "bias+relu")


def check_grouped_case(name, dtype, seed, gemm, fusion="plain"):
    use_gemm(gemm)
    sizes, tail, a, b = GROUPED_CASES[name]
    layout = layout_of(sizes, tail)
    e, n = len(sizes), layout.num_rows
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, a))
    kernel = rng.normal(size=(e, a, b)) / np.sqrt(a)
    bias = rng.normal(size=(e, b))
    cot = rng.normal(size=(n, b))
    expert = np.asarray(layout.tile_expert)
    used = expert < e
    safe = np.minimum(expert, e - 1)

    def exact(x):  # float64 of the values the kernel sees (rounded to dtype)
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)

    r64, k64, b64, c64 = exact(rows), exact(kernel), exact(bias), exact(cot)
    product = np.einsum("na,nab->nb", r64, k64[safe])
    pre = product + b64[safe] if fusion != "plain" else product
    relu = fusion == "bias+relu"
    want_out = np.where(used[:, None], np.maximum(pre, 0.0) if relu else pre, 0.0)
    # relu's mask: where the pre-activation is within rounding of 0, the
    # kernel's rounded value may fall on the other side, and then its
    # gradient (of the function it computed) rightly differs there; take
    # the kernel's own side in that band. (cuBLAS rounds the product to the
    # dtype before the bias, as the unfused path does: a band of a few
    # ulps of |product| + |bias|; CUTLASS adds the bias in float32.)
    band = 2.0 * EPSILON[dtype] * (np.abs(product) + np.abs(b64[safe]))

    def want_grads(out):
        positive = np.where(np.abs(pre) < band, out > 0, pre > 0) if relu else True
        d_pre = np.where(used[:, None], c64 * positive, 0.0)
        want_dk = np.zeros_like(k64)
        want_db = np.zeros_like(b64)
        for i in range(e):
            seg = expert == i
            want_dk[i] = r64[seg].T @ d_pre[seg]
            want_db[i] = d_pre[seg].sum(0)
        return np.einsum("nb,nab->na", d_pre, k64[safe]), want_dk, want_db

    if fusion == "plain":
        def f(rows, kernel, bias):
            del bias
            return grouped_matmul_lib.grouped_matmul(rows, kernel, layout, "custom_call")
    else:
        def f(rows, kernel, bias):
            return grouped_matmul_lib.grouped_matmul_bias(
                rows, kernel, bias, layout, "relu" if relu else None, "custom_call")

    args = [jnp.asarray(x, dtype) for x in (rows, kernel, bias)]
    row = {"case": name, "dtype": dtype, "gemm": gemm, "fusion": fusion, "rows": n}
    keys = ("out", "grad_rows", "grad_kernel") + (("grad_bias",) if fusion != "plain" else ())
    try:
        out, vjp = jax.vjp(jax.jit(f), *args)
        dr, dk, db = vjp(jnp.asarray(cot, dtype))
        jax.block_until_ready((out, dr, dk, db))
    except Exception as error:  # noqa: BLE001 - a failed case, reported
        print(f"  {name} {dtype} {gemm} {fusion}: {type(error).__name__}: "
              f"{str(error).splitlines()[0][:200]}")
        row.update({key: "error" for key in keys}, ok=False)
        return row
    checked = zip(keys, (want_out,) + want_grads(np.asarray(out.astype(jnp.float32))))
    ok = True
    for (key, want), got in zip(checked, (out, dr, dk, db)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        ok &= bool(np.isfinite(got).all())
        row[key] = rel(got, want)
        ok &= row[key] <= TOLERANCE[dtype]
    out = np.asarray(out.astype(jnp.float32))
    ok &= bool((out[~used] == 0).all())  # the tail is exactly 0, not act(bias)
    dk = np.asarray(dk.astype(jnp.float32))
    ok &= bool(all((dk[i] == 0).all() for i in range(e) if sizes[i] == 0))
    row["ok"] = ok
    return row


def _bad_call(sizes, dtype):
    layout = layout_of([4, 4, 4], 0)._replace(group_sizes=jnp.asarray(sizes, jnp.int32))
    return jax.block_until_ready(jax.jit(
        lambda r, k: grouped_matmul_lib.grouped_matmul(r, k, layout, "custom_call")
    )(jnp.ones((12, 8), dtype), jnp.ones((3, 8, 8), dtype)))


def check_bad_group_sizes():
    """Invalid group_sizes raise: at the call on cuBLAS (which reads them on
    the host) and with TF_MOE_CHECK_GROUP_SIZES=sync; on the CUTLASS kernel
    (which never waits for the host) the call writes zeros and the next call
    on the device raises, once."""
    results = {}
    good = layout_of([4, 4, 4], 0)
    rows, kernel = jnp.ones((12, 8), jnp.bfloat16), jnp.ones((3, 8, 8), jnp.bfloat16)
    good_fn = jax.jit(lambda r, k: grouped_matmul_lib.grouped_matmul(r, k, good, "custom_call"))
    for label, sizes in (("negative", [4, -1, 5]), ("sum > N", [8, 8, 8])):
        for gemm, dtype, sync in (("streams", jnp.float32, ""), ("cutlass", jnp.bfloat16, "sync")):
            os.environ["TF_MOE_GROUPED_GEMM"] = gemm
            os.environ["TF_MOE_CHECK_GROUP_SIZES"] = sync
            key = f"group_sizes {label} ({gemm}{', sync' if sync else ''})"
            results[key] = _error(lambda: _bad_call(sizes, dtype)) or "NO ERROR (bad)"
        os.environ["TF_MOE_GROUPED_GEMM"] = "cutlass"
        os.environ["TF_MOE_CHECK_GROUP_SIZES"] = ""
        key = f"group_sizes {label} (cutlass, deferred)"
        try:
            out = _bad_call(sizes, jnp.bfloat16)
        except Exception as error:  # noqa: BLE001 - a synchronous check ran instead
            results[key] = (f"UNEXPECTED: raised at the call, so the CUTLASS kernel did not "
                            f"run: {str(error).splitlines()[0][:100]}")
            continue
        if bool(jnp.any(out != 0)):
            results[key] = "NO ERROR (bad): the output of invalid sizes is not all 0"
            continue
        first = _error(lambda: jax.block_until_ready(good_fn(rows, kernel)))
        second = _error(lambda: jax.block_until_ready(good_fn(rows, kernel)))
        if first is None or "earlier" not in first or second is not None:
            results[key] = f"NO ERROR (bad): next call {first!r}, the one after {second!r}"
        else:
            results[key] = f"zeros, then the next call: {first}"
    os.environ.pop("TF_MOE_CHECK_GROUP_SIZES")
    os.environ.pop("TF_MOE_GROUPED_GEMM")
    return results


def check_dropless_moe(dtype, gemm):
    """Dropless MoE (custom_call, capacity None) == gather MoE with C = S."""
    from tf_moe.layers import MoE

    use_gemm(gemm)
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}[dtype]
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 256, 128)), jnp.float32)
    results = {}
    for path in ("gather", "custom_call"):
        keras.utils.set_random_seed(0)
        layer = MoE(16, 256, router=TopKRouter(k=2), capacity_factor=None,
                    group_size=256, dispatch=path, dtype=policy)
        layer.build(x.shape)
        assert layer.runs_dropless(True) == (path == "custom_call")
        trainable = [v.value for v in layer.trainable_variables]
        others = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            y, _ = layer.stateless_call(trainable, others, x, training=True)
            return jnp.sum(y.astype(jnp.float32) * jnp.cos(x)), y

        with jax.default_matmul_precision("highest"):
            (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
                trainable, x)
        results[path] = [y] + list(grads[0]) + [grads[1]]
    use_gemm(None)
    row = {"case": "dropless_moe", "dtype": dtype, "gemm": gemm}
    errors = [rel(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
              for a, b in zip(results["custom_call"], results["gather"])]
    row["max_rel"] = max(errors)
    row["ok"] = row["max_rel"] <= {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    return row


SECTIONS = ("dispatch", "grouped", "moe")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--gemms", default=",".join(ALL_GEMMS),
                        help="grouped matmuls checked (grouped and moe sections), "
                             f"a comma-separated subset of {','.join(ALL_GEMMS)}")
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; allowed: {','.join(SECTIONS)}")
    gemms = args.gemms.split(",")
    unknown = sorted(set(gemms) - set(ALL_GEMMS))
    if unknown:
        parser.error(f"--gemms: unknown {unknown}; allowed: {','.join(ALL_GEMMS)}")
    print(f"jax {jax.__version__}, keras {keras.__version__}, devices {jax.devices()}")
    print(f"custom_call available: {custom_call.is_available()}; "
          f"auto -> {resolve_plan('auto').path}")
    rows, errors, start = [], {}, time.time()
    if "dispatch" in sections:
        rows += dispatch_section(errors)
        print(f"[dispatch: {time.time() - start:.0f} s]")
    if "grouped" in sections:
        rows += grouped_section(errors, gemms)
        print(f"[grouped: {time.time() - start:.0f} s]")
    if "moe" in sections:
        rows += moe_section(gemms)
        print(f"[moe: {time.time() - start:.0f} s]")
    ok = all(row["ok"] for row in rows) and all(
        "NO ERROR" not in str(v) and "UNEXPECTED" not in str(v) for v in errors.values()
    )
    print(f"ALL OK ({','.join(sections)}; {','.join(gemms)})" if ok else "FAILURES")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "out_of_range": errors, "ok": ok, "sections": sections,
                       "device": str(jax.devices()[0])}, f, indent=1)
    return 0 if ok else 1


def dispatch_section(errors):
    """Dispatch/combine custom calls against einsum; out-of-range indices."""
    rows = []
    for dtype in ("float32", "bfloat16", "float16"):
        for seed, name in enumerate(CASES):
            rows.append(check_case(name, dtype, seed))
    header = ("case", "dtype", "routed", "dispatch", "combine", "grad_x", "grad_y",
              "grad_weight", "ok")
    print("relative error ||custom_call - einsum|| / ||einsum||")
    print(" ".join(f"{h:>11}" for h in header))
    for row in rows:
        print(" ".join(
            f"{row[h]:>11.2e}" if isinstance(row[h], float) else f"{str(row[h]):>11}"
            for h in header
        ))
    out_of_range = check_out_of_range()
    print("out-of-range indices:")
    for key, value in out_of_range.items():
        print(f"  {key}: {value}")
    errors.update(out_of_range)
    return rows


def grouped_section(errors, gemms):
    """Both CUDA grouped matmuls (plain and fused) against float64 numpy."""
    grouped = [check_grouped_case(name, dtype, seed, gemm, fusion)
               for dtype in ("float32", "bfloat16", "float16")
               for gemm in GEMMS[dtype] if gemm in gemms
               for fusion in FUSIONS
               for seed, name in enumerate(GROUPED_CASES)]
    use_gemm(None)
    streams = os.environ.get("TF_MOE_GEMM_STREAMS", "8")
    print(f"dropless grouped matmul (gemm = TF_MOE_GROUPED_GEMM; "
          f"TF_MOE_GEMM_STREAMS={streams}), relative error vs float64 numpy")
    header = ("case", "dtype", "gemm", "fusion", "rows", "out", "grad_rows", "grad_kernel",
              "grad_bias", "ok")
    print(" ".join(f"{h:>11}" for h in header))
    for row in grouped:
        print(" ".join(
            f"{row.get(h, '-'):>11.2e}" if isinstance(row.get(h), float)
            else f"{str(row.get(h, '-')):>11}"
            for h in header
        ))
    bad_sizes = check_bad_group_sizes()
    for key, value in bad_sizes.items():
        print(f"  {key}: {value}")
    errors.update(bad_sizes)
    return grouped


def moe_section(gemms):
    """The dropless MoE layer against the gather path with C = S."""
    moe_rows = [check_dropless_moe(dtype, gemm) for dtype in ("float32", "bfloat16")
                for gemm in GEMMS[dtype] if gemm in gemms]
    for row in moe_rows:
        print(f"  dropless MoE vs gather (C = S), {row['dtype']}, {row['gemm']}: max relative "
              f"error {row['max_rel']:.2e} {'ok' if row['ok'] else 'FAIL'}")
    return moe_rows


if __name__ == "__main__":
    sys.exit(main())
