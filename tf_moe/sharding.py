"""Expert parallelism on device meshes (JAX, `keras.distribution`).

Mesh axes: "batch" and "expert" shard the data (GShard's layout: the tokens
of a step are split over batch x expert devices, and the experts over
"expert", so a device holds E / expert of them); "model" shards each
expert's hidden dimension. `expert_parallel("batch:2,expert:4")` returns the
`ExpertParallel` distribution for any model built from tf_moe layers:

    keras.distribution.set_distribution(tf_moe.sharding.expert_parallel("expert:8"))
    model = build_model()          # variables are laid out as they are made
    model.fit(...)

Layout rules are regexes over variable paths (`EXPERT_LAYOUT_RULES`, as in
flaxformer/T5X partitioning rules): expert weights `<layer>/experts/wi|wi_gate`
[E, d, h] -> ("expert", None, "model"), `wo` [E, h, d] -> ("expert", "model",
None), biases alike; every other weight (routers, attention, embeddings) is
replicated. Inside an MoE layer the call's `DispatchPlan` holds a
`MeshExperts` (from `mesh_experts`), which makes routing groups that never
straddle devices and moves the dispatched tokens:
- einsum and gather run as one SPMD program: sharding constraints put the
  groups [G, S, d] on the data axes and the capacity buffers [E, G, C, d] on
  ("expert", "batch"); XLA turns the change of layout into all-to-alls.
- custom_call and dropless run per shard (`jax.shard_map`), Tutel's sandwich:
  local dispatch -> all_to_all over "expert" -> local experts -> all_to_all
  back -> local combine. Dropless rows travel in a worst-case buffer (every
  row of a device may belong to one expert shard): XLA:CPU has no
  ragged all-to-all.

The routers run outside the per-shard program, under SPMD on the sharded
groups, so their auxiliary losses are means over the global batch.

Owns: mesh axes, layout rules, data layout, groups per shard, the per-shard
program. Does not own: routing, dispatch math, expert math (the plan passes
them in).

Shape letters: G groups, S group size, d model dim, E experts, C capacity,
X expert shards, D data shards, N rows.
"""

import dataclasses
import math
import re

import keras
from keras import ops

from tf_moe._validation import check_positive_int

MESH_AXES = ("batch", "expert", "model")
DATA_AXES = ("batch", "expert")

# Variable path regex -> mesh axes of each dimension (keras LayoutMap keys:
# `re.fullmatch` on `variable.path`). Expert weights are [E, ...].
EXPERT_LAYOUT_RULES = {
    r".*experts/(wi|wi_gate)": ("expert", None, "model"),
    r".*experts/wo": ("expert", "model", None),
    r".*experts/bi": ("expert", None, None, "model"),
    r".*experts/bo": ("expert", None, None, None),
}


def parse_mesh(mesh):
    """{"batch": b, "expert": x, "model": m} from "batch:2,expert:4" or a
    dict; missing axes have size 1.

    Raises:
        ValueError: an unknown axis, a size that is not an integer >= 1.
    """
    if isinstance(mesh, str):
        entries = {}
        for part in filter(None, (p.strip() for p in mesh.split(","))):
            name, sep, size = part.partition(":")
            if not sep or not size.strip().lstrip("-").isdigit():
                raise ValueError(
                    "`mesh` must look like 'batch:2,expert:4' (axis:size, comma "
                    f"separated; axes {MESH_AXES}). Received: mesh={mesh!r}"
                )
            entries[name.strip()] = int(size)
        mesh = entries
    if not isinstance(mesh, dict):
        raise ValueError(
            f"`mesh` must be a string like 'batch:2,expert:4' or a dict. Received: mesh={mesh!r}"
        )
    for name, size in mesh.items():
        if name not in MESH_AXES:
            raise ValueError(
                f"`mesh` axes must be among {MESH_AXES}. Received: axis {name!r} "
                f"in mesh={mesh!r}"
            )
        check_positive_int(f"mesh[{name!r}]", size)
    return {name: mesh.get(name, 1) for name in MESH_AXES}


def _require_jax(what):
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"{what} needs the JAX backend (keras.distribution runs on JAX; on "
            "TensorFlow train data-parallel under tf.distribute, see "
            f"README 'Scaling out'). Received: backend={keras.backend.backend()!r}"
        )


class _MultiAxisLayout(keras.distribution.TensorLayout):
    """A `TensorLayout` whose entries may name several mesh axes (one
    dimension sharded over their product), as `jax.sharding.PartitionSpec`
    allows; Keras's own layout accepts one axis per dimension."""

    def _validate_axes(self):
        if self.device_mesh is None:
            return
        names = {
            axis
            for entry in self.axes
            for axis in (entry if isinstance(entry, tuple) else (entry,))
            if axis is not None
        }
        unknown = names - set(self.device_mesh.axis_names)
        if unknown:
            raise ValueError(
                f"Invalid axis names for Layout: {sorted(unknown)}. Valid axis "
                f"names: {self.device_mesh.axis_names}"
            )


class ExpertParallel(keras.distribution.ModelParallel):
    """`ModelParallel` with the data sharded over batch x expert and the
    expert weights over "expert" (GShard's layout), which tf_moe's MoE
    layers recognise (their calls then run expert-parallel).

    Build it with `expert_parallel`. Set it for the whole program
    (`keras.distribution.set_distribution`) before building the model: a
    layer reads the active distribution at every call, and variables are
    laid out when they are made.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with axes
            ("batch", "expert", "model").
        layout_map: a `keras.distribution.LayoutMap`, or None for
            `expert_layout_map(device_mesh)`.
        auto_shard_dataset: as for `ModelParallel`.
    """

    def __init__(self, device_mesh, layout_map=None, auto_shard_dataset=True):
        if tuple(device_mesh.axis_names) != MESH_AXES:
            raise ValueError(
                f"`device_mesh` must have axes {MESH_AXES}. Received: "
                f"axis_names={tuple(device_mesh.axis_names)}"
            )
        self._mesh_sizes = dict(zip(MESH_AXES, device_mesh.shape))
        super().__init__(
            layout_map=layout_map if layout_map is not None else expert_layout_map(device_mesh),
            batch_dim_name="batch",
            auto_shard_dataset=auto_shard_dataset,
        )

    @property
    def mesh_sizes(self):
        """dict axis -> size."""
        return dict(self._mesh_sizes)

    @property
    def num_data_shards(self):
        """D = batch x expert: the number of devices with distinct tokens."""
        return self._mesh_sizes["batch"] * self._mesh_sizes["expert"]

    @property
    def num_model_replicas(self):
        # Distinct data shards (Keras shards datasets over processes by it).
        return self.num_data_shards

    def get_data_layout(self, data_shape):
        if data_shape[0] is not None and data_shape[0] % self.num_data_shards:
            raise ValueError(
                f"The batch size must be divisible by the {self.num_data_shards} "
                f"data shards of the mesh (batch={self._mesh_sizes['batch']} x "
                f"expert={self._mesh_sizes['expert']}). Received: batch size "
                f"{data_shape[0]} (data shape {tuple(data_shape)})"
            )
        axes = [None] * len(data_shape)
        axes[0] = DATA_AXES
        return _MultiAxisLayout(axes, self.device_mesh)

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        for dim, axes in enumerate(layout.axes):
            for axis in axes if isinstance(axes, tuple) else (axes,):
                size = self._mesh_sizes.get(axis, 1)
                if axis is not None and variable.shape[dim] % size:
                    what = "experts" if dim == 0 and axis == "expert" else f"dimension {dim}"
                    raise ValueError(
                        f"{variable.path}: its {what} ({variable.shape[dim]}) must be "
                        f"divisible by the mesh's {axis!r} axis ({size}). Received: "
                        f"shape {tuple(variable.shape)}, mesh {self._mesh_sizes}"
                    )
        return layout


def expert_layout_map(device_mesh, rules=None):
    """A `keras.distribution.LayoutMap` of `rules` (default
    `EXPERT_LAYOUT_RULES`); other variables are replicated."""
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in (rules or EXPERT_LAYOUT_RULES).items():
        layout_map[pattern] = axes
    return layout_map


def expert_parallel(mesh, devices=None, auto_shard_dataset=True):
    """The `ExpertParallel` distribution of a mesh.

    Args:
        mesh: "batch:2,expert:4" (axis:size; axes batch, expert, model;
            missing ones are 1) or a dict.
        devices: the devices to use (default all: `keras.distribution.
            list_devices()`); their number must equal the mesh's size.

    Raises:
        ValueError: a bad mesh, or one whose size is not the device count;
            a backend other than JAX.
    """
    _require_jax("tf_moe.sharding.expert_parallel")
    sizes = parse_mesh(mesh)
    devices = list(devices) if devices is not None else keras.distribution.list_devices()
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"The mesh must use every device: batch x expert x model = {total}, "
            f"but there are {len(devices)} devices. Received: mesh={mesh!r}"
        )
    device_mesh = keras.distribution.DeviceMesh(
        shape=tuple(sizes[a] for a in MESH_AXES), axis_names=MESH_AXES, devices=devices
    )
    return ExpertParallel(device_mesh, auto_shard_dataset=auto_shard_dataset)


def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Joins a multi-process (multi-host) JAX job: `keras.distribution.
    initialize`, i.e. `jax.distributed.initialize` (arguments None: found
    from the environment on Cloud TPU and SLURM). On CPU it selects Gloo
    collectives first. Call before anything touches a device."""
    _require_jax("tf_moe.sharding.initialize")
    import jax

    if num_processes is not None and num_processes > 1 and process_id is None:
        raise ValueError(
            "`process_id` is required with `num_processes` > 1. Received: "
            f"num_processes={num_processes}, process_id=None"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(coordinator_address, num_processes, process_id)


def mesh_experts(num_experts):
    """The `MeshExperts` of an MoE layer with `num_experts` experts under the
    active distribution, or None when it is not an `ExpertParallel`.

    Raises:
        ValueError: E not divisible by the "expert" axis.
    """
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, ExpertParallel):
        return None
    sizes = distribution.mesh_sizes
    if num_experts % sizes["expert"]:
        raise ValueError(
            f"`num_experts` ({num_experts}) must be divisible by the mesh's 'expert' "
            f"axis ({sizes['expert']}). Received: num_experts={num_experts}, mesh {sizes}"
        )
    return MeshExperts(
        mesh=distribution.device_mesh.backend_mesh,
        num_data_shards=distribution.num_data_shards,
        num_expert_shards=sizes["expert"],
        num_model_shards=sizes["model"],
    )


@dataclasses.dataclass(frozen=True)
class MeshExperts:
    """How one MoE call spreads over an `ExpertParallel` mesh.

    Attributes:
        mesh: the `jax.sharding.Mesh`.
        num_data_shards: D = batch x expert.
        num_expert_shards: X, the size of the "expert" axis.
        num_model_shards: the size of the "model" axis.
    """

    mesh: object
    num_data_shards: int
    num_expert_shards: int
    num_model_shards: int

    def _sharding(self, *axes):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec(*axes))

    def constrain(self, x, *axes):
        import jax

        return jax.lax.with_sharding_constraint(x, self._sharding(*axes))

    def constrain_groups(self, x):
        """[G, ...] on the data axes."""
        return self.constrain(x, DATA_AXES)

    def constrain_buffers(self, x):
        """[E, G, C, d] with experts on "expert" and groups on "batch"."""
        return self.constrain(x, "expert", "batch")

    def to_experts(self, buffers):
        """[E, G, C, d] as dispatched (groups on the data axes, computed
        where they are) -> on the experts' devices. The change of layout is
        an all-to-all over "expert" (without the first constraint XLA
        all-gathers the tokens and dispatches redundantly)."""
        return self.constrain_buffers(self.constrain(buffers, None, DATA_AXES))

    def to_groups(self, buffers):
        """The inverse of `to_experts`: back to the groups' devices."""
        return self.constrain(self.constrain_buffers(buffers), None, DATA_AXES)

    # -- groups ------------------------------------------------------------

    def group(self, tokens, group_size):
        """tokens [T, d] (sharded over the D data shards in order) -> (groups
        [D * G_d, S', d], token_mask [D * G_d, S']): each shard's T / D tokens
        form G_d = ceil(T / D / S') groups of S' = min(group_size, T / D), the
        last padded, so that no group straddles two devices.

        Raises:
            ValueError: T not divisible by D.
        """
        num_tokens, d = tokens.shape
        shards = self.num_data_shards
        if num_tokens is None or num_tokens % shards:
            raise ValueError(
                f"The tokens of a call ({num_tokens}) must be divisible by the "
                f"{shards} data shards of the mesh (batch x expert), so that "
                "routing groups do not straddle devices. Use a batch size "
                f"divisible by {shards}."
            )
        per_shard = num_tokens // shards
        size = min(group_size, per_shard)
        padding = (-per_shard) % size
        x = self.constrain(ops.reshape(tokens, (shards, per_shard, d)), DATA_AXES)
        x = ops.pad(x, [[0, 0], [0, padding], [0, 0]])
        groups = self.constrain_groups(ops.reshape(x, (-1, size, d)))  # [G, S', d]
        real = ops.arange(per_shard + padding) < per_shard  # [T_d + pad]
        mask = ops.broadcast_to(real[None], (shards, per_shard + padding))
        return groups, self.constrain_groups(ops.reshape(mask, (-1, size)))

    def ungroup(self, outputs, num_tokens):
        """[G, S', d] from `group` -> [T, d] (padding dropped)."""
        shards, d = self.num_data_shards, outputs.shape[-1]
        per_shard = num_tokens // shards
        x = ops.reshape(outputs, (shards, -1, d))[:, :per_shard]
        return self.constrain(ops.reshape(x, (num_tokens, d)), DATA_AXES)

    # -- the per-shard program ---------------------------------------------

    def per_shard(self, local, groups, routing, params, extra=()):
        """Runs local(groups, routing, params, *extra) on every device with its
        groups (and their routing) and its experts' weights, as one
        `jax.shard_map` program; returns the [G, S, d] outputs.

        `params` are sharded by the expert layout rules ([E, ...] on
        "expert", the hidden dim on "model"); `extra` values are replicated.
        """
        import jax
        from jax.sharding import PartitionSpec as P

        arrays, rebuild = _routing_arrays(routing)
        param_specs = {name: _PARAM_SPECS[name] for name in params}

        def body(groups, arrays, params, extra):
            return local(groups, rebuild(arrays), params, *extra)

        return jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(P(DATA_AXES), [P(DATA_AXES)] * len(arrays), param_specs,
                      tuple(P() for _ in extra)),
            out_specs=P(DATA_AXES),
            # The custom calls' VJPs give results without JAX's varying-axes
            # annotation; unchecked, shard_map still sums the replicated
            # inputs' cotangents over the axes they are replicated on.
            check_vma=False,
        )(groups, arrays, params, tuple(extra))

    def all_to_all_experts(self, buffers):
        """Local [E, G_l, ...] (all experts, this device's groups) -> [E / X,
        X * G_l, ...] (this device's experts, the groups of its "expert" row)."""
        import jax

        return jax.lax.all_to_all(buffers, "expert", 0, 1, tiled=True)

    def all_to_all_groups(self, buffers):
        """The inverse of `all_to_all_experts`."""
        import jax

        return jax.lax.all_to_all(buffers, "expert", 1, 0, tiled=True)

    def exchange_rows(self, rows, group_sizes):
        """Sends expert-sorted rows to the devices that hold their experts.

        Args:
            rows: [N, d] this device's rows, sorted by expert (all E) in
                segments of `group_sizes` <int32>[E] from row 0.

        Returns:
            (received [X * N, d] sorted by this device's E / X experts, their
            group sizes <int32>[E / X], back: fn([X * N, b]) -> [N, b] that
            returns each row's result to its place in `rows`; 0 for rows past
            the segments).

        Each destination gets a worst-case buffer of N rows (every row of a
        device may go to one expert shard): X * N rows per device.
        """
        import jax
        import jax.numpy as jnp

        num_rows, shards = rows.shape[0], self.num_expert_shards
        chunks = jnp.reshape(group_sizes, (shards, -1))  # [X, E/X]
        send_len = jnp.sum(chunks, axis=1)  # [X]
        send_start = jnp.cumsum(send_len) - send_len
        slot = jnp.arange(num_rows, dtype=jnp.int32)
        # Shape: [X, N]; row send_start[j] + i of `rows` goes to shard j.
        source = send_start[:, None] + slot[None, :]
        valid = slot[None, :] < send_len[:, None]
        padded = jnp.concatenate([rows, jnp.zeros_like(rows[:1])], 0)
        send = padded[jnp.where(valid, source, num_rows)]  # [X, N, d]
        received = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [X, N, d]
        sizes = jax.lax.all_to_all(chunks, "expert", 0, 0, tiled=True)  # [X src, E/X]
        # Sort what arrived by local expert (then by source, then by row).
        ends = jnp.cumsum(sizes, axis=1)  # [X, E/X] per source
        expert = jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1)  # [X, N]
        arrived = expert < sizes.shape[1]
        expert = jnp.minimum(expert, sizes.shape[1] - 1)
        start_in_source = jnp.take_along_axis(ends - sizes, expert, axis=1)
        local_sizes = jnp.sum(sizes, axis=0)  # [E/X]
        expert_start = jnp.cumsum(local_sizes) - local_sizes
        before = jnp.cumsum(sizes, axis=0) - sizes  # [X, E/X]: earlier sources
        dest = (expert_start[expert] + jnp.take_along_axis(before, expert, axis=1)
                + slot[None, :] - start_in_source)
        total = shards * num_rows
        dest = jnp.where(arrived, dest, total).reshape(-1)  # [X * N]
        order = jnp.full((total + 1,), total, jnp.int32).at[dest].set(
            jnp.arange(total, dtype=jnp.int32))[:total]  # dest -> arrival index
        flat = jnp.concatenate([received.reshape(total, -1), jnp.zeros_like(rows[:1])], 0)
        sorted_rows = flat[order]  # [X * N, d]

        def back(out):  # [X * N, b] in sorted order -> [N, b] in `rows` order
            padded_out = jnp.concatenate([out, jnp.zeros_like(out[:1])], 0)
            by_arrival = padded_out[dest].reshape(shards, num_rows, -1)  # [X, N, b]
            returned = jax.lax.all_to_all(by_arrival, "expert", 0, 0, tiled=True)
            # Row r of `rows` went to shard j(r) at position r - send_start[j].
            shard = jnp.sum(slot[:, None] >= jnp.cumsum(send_len)[None, :], axis=-1)
            mine = shard < shards
            shard = jnp.minimum(shard, shards - 1)
            index = jnp.where(mine, shard * num_rows + slot - send_start[shard], total)
            flat_back = jnp.concatenate(
                [returned.reshape(total, -1), jnp.zeros_like(out[:1])], 0)
            return flat_back[index]

        return sorted_rows, local_sizes, back

    def device_seed(self, seed):
        """A replicated seed made distinct per device (inside `per_shard`)."""
        import jax

        index = jax.lax.axis_index(DATA_AXES) * self.num_model_shards
        if self.num_model_shards > 1:
            index = index + jax.lax.axis_index("model")
        return jax.random.fold_in(seed, index) if _is_key(seed) else seed + index

    def sum_over_model(self, x):
        """Partial sums of a hidden-dim-sharded matmul -> the full result."""
        if self.num_model_shards == 1:
            return x
        import jax

        return jax.lax.psum(x, "model")


def _is_key(seed):
    import jax

    return jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)


_PARAM_SPECS_AXES = {
    "wi": ("expert", None, "model"),
    "wi_gate": ("expert", None, "model"),
    "wo": ("expert", "model", None),
    "bi": ("expert", None, None, "model"),
    "bo": ("expert", None, None, None),
}


class _Specs(dict):
    def __missing__(self, name):
        from jax.sharding import PartitionSpec

        self[name] = PartitionSpec(*_PARAM_SPECS_AXES[name])
        return self[name]


_PARAM_SPECS = _Specs()

# Routing fields that are arrays over groups (passed into the per-shard
# program, sharded on the data axes).
_ROUTING_ARRAYS = ("expert_index", "position", "dispatch_mask", "combine_weight",
                   "requested_mask", "token_mask", "slot_token", "slot_weight")


def _routing_arrays(routing):
    """(list of the routing's group arrays, fn(list) -> Routing)."""
    names = [n for n in _ROUTING_ARRAYS if getattr(routing, n) is not None]
    arrays = [getattr(routing, n) for n in names]

    def rebuild(values):
        return routing._replace(
            router_probs=None, aux_losses={}, **dict(zip(names, values))
        )

    return arrays, rebuild


def layout_rule_for(path):
    """The mesh axes `EXPERT_LAYOUT_RULES` give `path`, or None (replicated)."""
    for pattern, axes in EXPERT_LAYOUT_RULES.items():
        if re.fullmatch(pattern, path):
            return axes
    return None
