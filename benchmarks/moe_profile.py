"""Per-op profile of the MoE layer's jitted forward+backward step (Keras-on-JAX).

For each dispatch path: compiles the same step as `benchmarks/moe_layer.py`
(layer output and gradients w.r.t. the input and all trainable weights, aux
losses included), writes the optimized HLO, times it (median of --iters), then
records a `jax.profiler` trace of --trace_iters steps and reads it back with
`jax.profiler.ProfileData`. Every device op (an HLO instruction: fusion, GEMM,
custom call, ...) is attributed to the Python line that produced it (the HLO
`metadata` source_file:source_line of the instruction) and to a category
(expert matmuls, expert elementwise, dispatch/combine, routing, statistics,
losses, other). Prints the top ops, the per-category totals, and the GPU idle
time inside a step (the step's wall time minus the union of the kernels'
busy intervals).

Paths and what-if rows are specs "path[+mod...]"; what-if rows are timed
only. Mods change one piece of the layer to measure its cost: `fix` (the
Experts' Dropout sublayer built with the MoE's dtype policy), `cf1` (capacity
factor 1.0), `no_stats` (routing statistics replaced by zeros), `no_aux`
(router without aux losses), `no_bias` (experts without biases),
`scan_positions` (assign_positions with a `lax.associative_scan` cumsum),
`sort_positions` (assign_positions by a stable sort instead of a [G, k*S, E]
one-hot cumsum), `dropless` / `droplessN` (tf_moe.ops.dropless with segments
padded to N rows instead of capacity buffers; grouped matmul by
"auto", with `rd` by `lax.ragged_dot`, with `cc` by the custom call: CPU
handlers, or cuBLAS on a GPU).

Usage (GPU; command buffers off so that every kernel carries its HLO op):
    KERAS_BACKEND=jax XLA_FLAGS=--xla_gpu_enable_command_buffer= \
        python benchmarks/moe_profile.py --out /tmp/prof
    KERAS_BACKEND=jax python benchmarks/moe_profile.py --trace_iters 0 \
        --paths dense,custom_call --what_if_path custom_call \
        --what_ifs custom_call+cf1,custom_call+dropless+cc
(`fix` is a no-op since `Experts` and its Dropout follow the MoE's dtype
policy; it stays to rerun the historical tables.)
"""

import argparse
import collections
import contextlib
import glob
import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_moe  # noqa: E402
from tf_moe import metrics as metrics_lib  # noqa: E402
from tf_moe.ops import dropless as dropless_lib  # noqa: E402
from timing import time_step  # noqa: E402  (benchmarks/ is sys.path[0])
from tf_moe.routing import capacity as capacity_lib  # noqa: E402

WHAT_IFS = tuple(
    "custom_call+" + m for m in ("no_stats", "no_aux", "no_bias", "scan_positions", "sort_positions")
)


def build_layer(args, spec):
    """The layer for `spec` = "path[+mod...]"; mods: `no_aux`, `no_bias`,
    `cf1` (capacity factor 1.0), `fix` (the Experts' internal Dropout built
    with the MoE's dtype policy, so that it no longer casts the hidden
    activations to float32), plus the patches of `patched`."""
    path, *mods = spec.split("+")
    router_kwargs = {}
    if "no_aux" in mods:
        router_kwargs = {"balance_loss_weight": 0.0, "z_loss_weight": 0.0}
    if path == "dense":
        return keras.Sequential(
            [
                keras.layers.Dense(args.k * args.h, activation="relu", dtype=args.dtype),
                keras.layers.Dense(args.d, dtype=args.dtype),
            ]
        )
    # "dropless": the layer's own dropless mode (custom-call dispatch,
    # capacity_factor=None), as in benchmarks/moe_layer.py.
    capacity_factor = None if path == "dropless" else 1.0 if "cf1" in mods else args.capacity_factor
    layer = tf_moe.layers.MoE(
        num_experts=args.experts,
        expert_hidden_dim=args.h,
        router=tf_moe.routing.TopKRouter(k=args.k, **router_kwargs),
        capacity_factor=capacity_factor,
        group_size=args.group_size,
        dispatch="custom_call" if path == "dropless" else path,
        expert_use_bias="no_bias" not in mods,
        dtype=args.dtype,
    )
    if "fix" in mods:
        layer.experts.dropout_layer = keras.layers.Dropout(
            layer.experts.dropout, dtype=layer.dtype_policy
        )
    dropless_mod = next((m for m in mods if m.startswith("dropless")), None)
    if dropless_mod:
        # What `MoE.route_and_compute` does for capacity_factor=None on the
        # custom-call path, with the grouped matmul and the tile chosen here:
        # route with C = S, then tf_moe.ops.dropless. "droplessN" pads
        # segments to N rows (default 1).
        tile = int(dropless_mod[len("dropless"):] or 1)

        implementation = "custom_call" if "cc" in mods else "ragged_dot" if "rd" in mods else "auto"

        def route_and_compute(groups, token_mask, training):
            routing = layer.router.route(groups, groups.shape[1], token_mask, training)
            layout = dropless_lib.dropless_layout(routing, tile)
            kernels = implementation == "custom_call" and tile == 1
            rows = dropless_lib.dispatch_rows(groups, routing, layout, kernels)
            out_rows = layer.experts.on_rows(rows, layout, training, implementation)
            outputs = dropless_lib.combine_rows(out_rows, routing, layout, kernels)
            return outputs, metrics_lib.routing_stats(routing)

        layer.route_and_compute = route_and_compute
    return layer


def _zero_stats(routing):
    stats = {"expert_load": jnp.zeros((routing.num_experts,), jnp.float32)}
    stats.update({name: jnp.zeros((), jnp.float32) for name in metrics_lib.SCALAR_STATS})
    stats.update(routing.aux_losses)
    return stats


def _scan_positions(expert_index, requested_mask, num_experts, priority=None):
    """assign_positions with the running count by lax.associative_scan."""
    assert priority is None
    g, s, k = expert_index.shape
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
    onehot = onehot * requested_mask.astype(jnp.int32)[..., None]
    ranked = jnp.transpose(onehot, (0, 2, 1, 3)).reshape(g, k * s, num_experts)
    count = jax.lax.associative_scan(jnp.add, ranked, axis=1)
    position = jnp.sum((count - 1) * ranked, axis=-1)
    position = jnp.transpose(position.reshape(g, k, s), (0, 2, 1))
    return jnp.where(requested_mask, position, -1)


def _sort_positions(expert_index, requested_mask, num_experts, priority=None):
    """assign_positions by a stable sort of (expert, rank-major order)."""
    assert priority is None
    g, s, k = expert_index.shape
    n = k * s
    # Rank-major order: choice j of token t has order j * S + t.
    e = jnp.where(requested_mask, expert_index, num_experts)
    e = jnp.transpose(e, (0, 2, 1)).reshape(g, n)  # [G, k*S]
    order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (g, n))
    sorted_e, sorted_order = jax.lax.sort((e, order), dimension=1, num_keys=1, is_stable=True)
    # Start of each expert's segment in the sorted order.
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (g, n))
    is_start = jnp.concatenate(
        [jnp.ones((g, 1), bool), sorted_e[:, 1:] != sorted_e[:, :-1]], axis=1
    )
    seg_start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
    pos_sorted = idx - seg_start
    position = jnp.zeros((g, n), jnp.int32)
    position = position.at[jnp.arange(g)[:, None], sorted_order].set(pos_sorted)
    position = jnp.transpose(position.reshape(g, k, s), (0, 2, 1))
    return jnp.where(requested_mask, position, -1)


@contextlib.contextmanager
def patched(spec):
    mods = spec.split("+")[1:]
    saved = (metrics_lib.routing_stats, capacity_lib.assign_positions)
    try:
        if "no_stats" in mods:
            metrics_lib.routing_stats = _zero_stats
        if "scan_positions" in mods:
            capacity_lib.assign_positions = _scan_positions
        if "sort_positions" in mods:
            capacity_lib.assign_positions = _sort_positions
        yield
    finally:
        metrics_lib.routing_stats, capacity_lib.assign_positions = saved


def make_step(layer, x, cotangent):
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    is_moe = isinstance(layer, tf_moe.layers.MoE)

    def loss_fn(trainable, x):
        if is_moe:
            y, _, losses = layer.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
        else:
            y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
            losses = []
        loss = jnp.sum(y.astype(jnp.float32) * cotangent)
        return loss + sum(losses) if losses else loss

    fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))
    return fn, (trainable, x)


def time_fn(fn, fargs, warmup, iters):
    """(median ms, best ms) of `fn(*fargs)`, with moe_layer.py's timer."""
    median, best = time_step(lambda: jax.block_until_ready(fn(*fargs)), warmup, iters)
    return median * 1e3, best * 1e3


# ---------------------------------------------------------------- HLO metadata

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_SRC = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')


def _stack_tables(hlo_text):
    """frame id -> list of 'file:line' (innermost first) from the HLO text's
    FileNames / FunctionNames / FileLocations / StackFrames tables."""
    tables = {}
    section = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            tables[section] = {}
            continue
        if not line.strip():
            section = None
            continue
        if section:
            idx, _, rest = line.partition(" ")
            tables[section][int(idx)] = rest
    files = {i: v.strip('"') for i, v in tables.get("FileNames", {}).items()}
    locations = {}
    for i, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        ln = re.search(r"\bline=(\d+)", v)
        locations[i] = (files.get(int(f.group(1)), "?") if f else "?", ln.group(1) if ln else "?")
    frames = {}
    for i, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        par = re.search(r"parent_frame_id=(\d+)", v)
        frames[i] = (int(loc.group(1)) if loc else 0, int(par.group(1)) - 1 if par else 0)

    def chain(frame_id):
        out, seen = [], set()
        while frame_id and frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            out.append(locations.get(loc, ("?", "?")))
            frame_id = parent
        return out

    return chain


def _project_src(frames):
    """Innermost frames in the project (tf_moe/, benchmarks/), as 'file:line'."""
    picked = []
    for path, line in frames:
        m = re.search(r"(tf_moe/.*|benchmarks/.*)$", path)
        if m and "traceback" not in path:
            picked.append(f"{m.group(1).replace('tf_moe/', '')}:{line}")
    return " < ".join(picked[:3])


def hlo_metadata(hlo_text):
    """instruction name -> {opcode, op_name, src} from HLO text. `src` is
    the innermost project source lines of the instruction's stack frame (for
    fusions without metadata: of the fused computation's first instruction
    that has some)."""
    chain = _stack_tables(hlo_text)
    meta = {}
    comp_meta = {}
    current = None
    calls = {}
    for line in hlo_text.splitlines():
        stripped = line.strip()
        head = re.match(r"(?:ENTRY\s+)?%([\w.\-]+)\s*(\(|\{)", stripped)
        if head and stripped.endswith("{") and " = " not in stripped.split("(")[0]:
            current = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        op = _OPNAME.search(rest)
        src = _SRC.search(rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        opcode = re.search(r"\b([a-z][a-z\-]*)\(", rest)
        kind = re.search(r"kind=(\w+)", rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if src:
            where = f"{os.path.basename(src.group(1))}:{src.group(2)}"
        elif frame:
            where = _project_src(chain(int(frame.group(1))))
        else:
            where = ""
        entry = {
            "opcode": (opcode.group(1) if opcode else "?")
            + (f":{kind.group(1)}" if kind else "")
            + (f":{target.group(1)}" if target else ""),
            "op_name": op.group(1) if op else "",
            "src": where,
        }
        meta[name] = entry
        if called:
            calls[name] = called.group(1)
        if current is not None and entry["src"]:
            comp_meta.setdefault(current, entry)
    for name, comp in calls.items():
        if not meta[name]["src"] and comp in comp_meta:
            meta[name]["src"] = comp_meta[comp]["src"]
            meta[name]["op_name"] = meta[name]["op_name"] or comp_meta[comp]["op_name"]
    return meta


CATEGORY_RULES = (
    # (category, regex on "src op_name opcode")
    # (Grouped matmuls first: their custom calls are made in custom_call.py.)
    ("grouped matmuls (dropless)", r"^\S*grouped_matmul\.py|tf_moe_grouped_matmul"),
    ("dispatch/combine", r"^\S*(dispatch\.py|custom_call\.py)|tf_moe_dispatch|tf_moe_combine"),
    ("dropless layout/rows/bias", r"^\S*dropless\.py"),
    ("routing positions", r"^\S*capacity\.py"),
    ("routing statistics", r"^\S*metrics\.py"),
    ("aux losses", r"^\S*losses\.py"),
    ("router (gate, softmax, top-k)", r"^\S*(router\.py|top_k\.py)"),
    ("expert matmuls", r"^\S*experts\.py.*(dot|gemm|cublas|custom-call|kCustom)"),
    ("expert elementwise", r"^\S*experts\.py"),
    ("layer glue (grouping, stats assign, casts)", r"^\S*moe\.py"),
    ("benchmark loss", r"^\S*moe_profile\.py"),
    ("dense FFN", r"keras/src/layers/core/dense\.py|activations"),
)


def categorize(entry, event_name):
    text = f"{entry.get('src', '')} {entry.get('op_name', '')} {entry.get('opcode', '')} {event_name}"
    for category, rule in CATEGORY_RULES:
        if re.search(rule, text):
            return category
    if re.search(r"gemm|dot|cublas", text):
        return "other matmuls"
    return "other"


# ---------------------------------------------------------------- trace reading


def read_trace(trace_dir, iters, meta):
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        return {"error": f"no xplane.pb under {trace_dir}"}
    profile = jax.profiler.ProfileData.from_file(files[-1])
    planes = list(profile.planes)
    device_planes = [p for p in planes if p.name.startswith("/device:GPU")] or [
        p for p in planes if p.name.startswith("/device:")
    ]
    summary = {"planes": [p.name for p in planes], "lines": {}}
    cpu = not device_planes
    if cpu:  # CPU run (for testing the parser): XLA's thunk-executor lines
        device_planes = [p for p in planes if p.name == "/host:CPU"]
        if not device_planes:
            return {**summary, "error": "no device plane"}
    plane = device_planes[0]
    lines = {line.name: list(line.events) for line in plane.lines}
    for name, events in lines.items():
        summary["lines"][name] = {
            "events": len(events),
            "ms_total": sum(e.duration_ns for e in events) / 1e6,
        }
    op_line = next((n for n in lines if n == "XLA Ops"), None)
    kernel_lines = [n for n in lines if n.startswith("Stream")] or [op_line]
    if cpu:
        kernel_lines = [n for n in lines if n.startswith("tf_XLAEigen")]
    # Per-op aggregation (XLA Ops line: one event per HLO instruction run).
    ops_events = lines.get(op_line, []) if op_line else []
    if not ops_events:
        ops_events = [e for n in kernel_lines for e in lines[n]]
    agg = collections.defaultdict(lambda: {"ns": 0, "count": 0, "stats": {}, "kernels": set()})
    for event in ops_events:
        stats = {}
        with contextlib.suppress(Exception):
            stats = {k: str(v)[:300] for k, v in event.stats}
        # Kernels carry their HLO instruction in the `hlo_op` stat; several
        # HLO ops can share one kernel name (e.g. a cuBLAS GEMM kernel).
        key = stats.get("hlo_op") or event.name
        a = agg[key]
        a["ns"] += event.duration_ns
        a["count"] += 1
        a["kernels"].add(event.name[:60])
        if not a["stats"]:
            a["stats"] = stats
    rows = []
    for name, a in agg.items():
        entry = meta.get(name.lstrip("%"), {})
        rows.append(
            {
                "op": name,
                "ms_per_step": a["ns"] / 1e6 / iters,
                "count_per_step": a["count"] / iters,
                "opcode": entry.get("opcode", ""),
                "src": entry.get("src", ""),
                "op_name": entry.get("op_name", "")[-160:],
                "category": categorize(entry, name + " " + " ".join(sorted(a["kernels"]))),
                "kernels": sorted(a["kernels"])[:3],
                "stats": a["stats"],
            }
        )
    rows.sort(key=lambda r: -r["ms_per_step"])
    # Busy time: union of kernel intervals on the stream lines, and step span.
    intervals = sorted(
        (e.start_ns, e.start_ns + e.duration_ns) for n in kernel_lines for e in lines.get(n, [])
    )
    busy, cur_s, cur_e = 0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    modules = lines.get("XLA Modules", [])
    step_modules = [e for e in modules if "loss_fn" in e.name or "grad" in e.name] or modules
    summary.update(
        {
            "op_line": op_line,
            "kernel_lines": kernel_lines,
            "busy_ms_per_step": busy / 1e6 / iters,
            "module_ms": [e.duration_ns / 1e6 for e in step_modules][:20],
            "ops": rows,
        }
    )
    categories = collections.defaultdict(float)
    for r in rows:
        categories[r["category"]] += r["ms_per_step"]
    summary["categories"] = dict(sorted(categories.items(), key=lambda kv: -kv[1]))
    return summary


def print_profile(path, result, top):
    print(f"\n=== {path}: step {result['ms']:.2f} ms (median), ops total "
          f"{sum(r['ms_per_step'] for r in result['trace'].get('ops', [])):.2f} ms, "
          f"GPU busy {result['trace'].get('busy_ms_per_step', float('nan')):.2f} ms/step; "
          f"module {statistics.median(result['trace'].get('module_ms') or [float('nan')]):.2f} ms")
    print(f"{'ms/step':>8} {'n':>4}  {'category':<28} {'op':<28} {'opcode':<34} src / op_name")
    for r in result["trace"].get("ops", [])[:top]:
        print(f"{r['ms_per_step']:8.3f} {r['count_per_step']:4.0f}  {r['category'][:28]:<28} "
              f"{r['op'][:28]:<28} {r['opcode'][:34]:<34} {r['src']} {r['op_name'][-70:]}"
              + ("" if r["src"] else f" [{','.join(r['kernels'])[:90]}]"))
    print("by category:")
    for c, ms in result["trace"].get("categories", {}).items():
        print(f"  {ms:8.3f}  {c}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--h", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--group_size", type=int, default=1024)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--paths", default="dense,custom_call,gather")
    parser.add_argument("--what_ifs", default=",".join(WHAT_IFS))
    parser.add_argument("--what_if_path", default="custom_call")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--trace_iters", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="/tmp/moe_profile")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.tokens, args.d)), args.dtype)
    cot = jnp.asarray(rng.normal(size=(args.tokens, args.d)), jnp.float32)
    device = jax.devices()[0]
    report = {
        "config": vars(args),
        "device": f"{device.platform}: {getattr(device, 'device_kind', device)}",
        "jax": jax.__version__,
        "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "paths": {},
        "what_ifs": {},
    }
    print(json.dumps({k: report[k] for k in ("device", "jax", "keras", "date")}), flush=True)

    def save():
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(report, f, indent=1)

    for path in [p for p in args.paths.split(",") if p]:
        try:
            keras.utils.set_random_seed(0)
            with patched(path):
                layer = build_layer(args, path)
                layer.build((args.tokens, args.d))
                fn, fargs = make_step(layer, x, cot)
                compiled = fn.lower(*fargs).compile()
            hlo = compiled.as_text()
            with open(os.path.join(args.out, f"hlo_{path.replace('+', '_')}.txt"), "w") as f:
                f.write(hlo)
            cost = {}
            with contextlib.suppress(Exception):
                ca = compiled.cost_analysis()
                ca = ca[0] if isinstance(ca, (list, tuple)) else ca
                cost = {k: float(v) for k, v in ca.items() if k in ("flops", "bytes accessed", "transcendentals")}
            ms, best = time_fn(fn, fargs, args.warmup, args.iters)
            result = {"ms": ms, "best_ms": best, "cost_analysis": cost}
            print(f"{path}: {ms:.2f} ms (median of {args.iters})", flush=True)
            if not args.trace_iters:
                report["paths"][path] = result
                save()
                continue
            trace_dir = os.path.join("/tmp", f"trace_{path.replace('+', '_')}")
            jax.profiler.start_trace(trace_dir)
            for _ in range(args.trace_iters):
                jax.block_until_ready(fn(*fargs))
            jax.profiler.stop_trace()
            result["trace"] = read_trace(trace_dir, args.trace_iters, hlo_metadata(hlo))
            report["paths"][path] = result
            print_profile(path, result, args.top)
        except Exception as e:  # keep going: one path failing must not lose the rest
            import traceback

            traceback.print_exc()
            report["paths"][path] = {"error": repr(e)[:500]}
        save()
        sys.stdout.flush()

    base = report["paths"].get(args.what_if_path, {}).get("ms")
    for spec in [w for w in args.what_ifs.split(",") if w]:
        try:
            with patched(spec):
                keras.utils.set_random_seed(0)
                layer = build_layer(args, spec)
                layer.build((args.tokens, args.d))
                fn, fargs = make_step(layer, x, cot)
                ms, best = time_fn(fn, fargs, args.warmup, args.iters)
            report["what_ifs"][spec] = {"ms": ms, "best_ms": best, "saved_ms": (base - ms) if base else None}
            print(f"what-if {spec:>28}: {ms:7.2f} ms (base {args.what_if_path} {base})", flush=True)
        except Exception as e:
            report["what_ifs"][spec] = {"error": repr(e)[:500]}
            print(f"what-if {spec}: error {e!r}"[:300], flush=True)
        save()


if __name__ == "__main__":
    main()
