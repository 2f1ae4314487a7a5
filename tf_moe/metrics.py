"""Routing statistics and the Keras callback that reports them.

Owns: `routing_stats` (pure function of a `Routing`) and `RoutingStatsLogger`.
Does not own: where stats are stored (each MoE layer keeps its last stats in
non-trainable variables, which every backend updates inside compiled steps).

Shape letters: G groups, S tokens per group, E experts, k choices.
"""

import keras
from keras import ops

# Scalar statistics every MoE layer reports, besides its router's losses.
SCALAR_STATS = ("dropped_fraction", "unrouted_fraction", "router_entropy")


def routing_stats(routing):
    """Statistics of one routing, over real tokens.

    Returns:
        dict with
        - "expert_load": <float32>[E] fraction of routed choices per expert
          (sums to 1; uniform is 1 / E);
        - "dropped_fraction": fraction of requested choices dropped for
          capacity;
        - "unrouted_fraction": fraction of real tokens that reach no expert
          (their output is 0; a residual connection carries them);
        - "router_entropy": mean entropy (nats) of the router probabilities;
        - every weighted auxiliary loss in `routing.aux_losses`.
    """
    kept = ops.cast(routing.dispatch_mask, "float32")  # [G, S, k]
    requested = ops.cast(routing.requested_mask, "float32")  # [G, S, k]
    tokens = ops.cast(routing.token_mask, "float32")  # [G, S]
    if routing.slot_major:
        group_size = routing.token_mask.shape[-1]
        filled = ops.cast(routing.slot_token < group_size, "float32")  # [G, E, C]
        per_expert = ops.sum(filled, axis=(0, 2))  # [E]
    else:
        # Shape: [E]
        per_expert = ops.einsum(
            "gske,gsk->e", ops.one_hot(routing.expert_index, routing.num_experts), kept
        )
    num_kept = ops.sum(kept)
    num_tokens = ops.maximum(ops.sum(tokens), 1.0)
    probs = routing.router_probs  # [G, S, E]
    entropy = -ops.sum(probs * ops.log(ops.maximum(probs, 1e-20)), axis=-1)  # [G, S]
    routed = ops.cast(ops.any(routing.dispatch_mask, axis=-1), "float32")  # [G, S]
    stats = {
        "expert_load": per_expert / ops.maximum(num_kept, 1.0),
        "dropped_fraction": 1.0 - num_kept / ops.maximum(ops.sum(requested), 1.0),
        "unrouted_fraction": ops.sum(tokens * (1.0 - routed)) / num_tokens,
        "router_entropy": ops.sum(entropy * tokens) / num_tokens,
    }
    stats.update(routing.aux_losses)
    return stats


def moe_layers(model):
    """All layers of `model` (recursively) that keep routing statistics."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if hasattr(layer, "last_routing_stats")
    ]


class RoutingStatsLogger(keras.callbacks.Callback):
    """Adds every MoE layer's routing statistics to the `model.fit` and
    `model.evaluate` logs.

    The scalars of each layer appear as `<layer>/<stat>` in the progress bar,
    `History` and TensorBoard (put this callback anywhere in the list: Keras
    appends its own progress bar and History last); those of the validation
    run as `val_<layer>/<stat>`; after `evaluate(..., callbacks=[logger])`,
    `logger.test_stats` holds the last evaluation batch's. The per-expert load vector is
    summarized by `<layer>/max_load`, the largest expert's share times E (1.0
    is perfect balance), and `<layer>/load_cv`, its coefficient of variation
    (std / mean; 0 is perfect balance, the paper's CV(Load)).

    Args:
        layers: names of the MoE layers to report, or None for all.
    """

    def __init__(self, layers=None):
        super().__init__()
        self.layer_names = None if layers is None else tuple(layers)

    def _stats(self):
        logs = {}
        for layer in moe_layers(self.model):
            if self.layer_names is not None and layer.name not in self.layer_names:
                continue
            for name, value in layer.last_routing_stats.items():
                if name == "expert_load":
                    logs[f"{layer.name}/max_load"] = float(value.max() * value.size)
                    # Coefficient of variation of the load (0 is balanced).
                    logs[f"{layer.name}/load_cv"] = float(value.std() / max(value.mean(), 1e-12))
                else:
                    logs[f"{layer.name}/{name}"] = float(value)
        return logs

    def on_train_batch_end(self, batch, logs=None):
        self._last_train_stats = self._stats()
        if logs is not None:
            logs.update(self._last_train_stats)

    def on_test_batch_end(self, batch, logs=None):
        if logs is not None:
            logs.update(self._stats())

    def on_test_begin(self, logs=None):
        self.test_stats = {}

    def on_test_end(self, logs=None):
        # The statistics of the last evaluation batch: `fit` reports them as
        # `val_<layer>/<stat>` at the epoch's end (Keras hands `on_test_end` a
        # copy of the logs that `evaluate` returns, so they cannot go there).
        self.test_stats = self._stats()

    def on_epoch_end(self, epoch, logs=None):
        # The layers now hold the last validation batch's stats; report the
        # last training batch's under the plain names, the validation's under
        # `val_`.
        if logs is not None:
            logs.update(getattr(self, "_last_train_stats", {}))
            logs.update({f"val_{k}": v for k, v in getattr(self, "test_stats", {}).items()})
            self.test_stats = {}


def parameter_summary(model):
    """Experts and parameters of every MoE layer of `model`, and the model's
    total and active (per token) parameter counts: what `model.summary()`
    does not show, since an MoE layer is one row there.

    Returns:
        dict with "layers": [{"name", "experts", "total", "active"}] (active:
        the parameters one token uses, at the training capacity factor) and
        "total", "active" of the whole model; `print_parameter_summary`
        prints it as a table.
    """
    import numpy as np

    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    rows, inactive = [], 0.0
    for layer in moe_layers(model):
        count = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
        experts = sum(int(np.prod(v.shape)) for v in layer.experts.trainable_variables)
        unused = experts * (1.0 - layer.active_expert_fraction)
        inactive += unused
        rows.append({"name": layer.name, "experts": layer.experts.num_experts,
                     "total": count, "active": int(round(count - unused))})
    return {"layers": rows, "total": total, "active": int(round(total - inactive))}


def print_parameter_summary(model, print_fn=print):
    """Prints `parameter_summary(model)` as a table."""
    summary = parameter_summary(model)
    print_fn(f"{'MoE layer':<28} {'experts':>8} {'parameters':>14} {'active / token':>15}")
    for row in summary["layers"]:
        print_fn(f"{row['name']:<28} {row['experts']:>8} {row['total']:>14,} {row['active']:>15,}")
    print_fn(f"{'model':<28} {'':>8} {summary['total']:>14,} {summary['active']:>15,}")
