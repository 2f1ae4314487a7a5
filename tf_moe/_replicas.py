"""Sums over the global batch under TensorFlow's data parallelism.

Under `tf.distribute` (MirroredStrategy, MultiWorkerMirroredStrategy,
TPUStrategy) each replica runs the step on its share of the batch, so a sum
over the batch's tokens is a per-replica partial sum. The auxiliary losses
need the global one (the balance loss is a product of two means, the
importance and load losses a CV^2 of per-expert sums): `global_sum` adds the
replicas' partial sums with a differentiable all-reduce, so every replica
computes the one-device loss and the summed gradients are the one-device
gradients. Off a replica context (one device, JAX, or a JAX SPMD program,
which is global already) it is the identity.

`ReplicaLocalLosses` keeps a layer's `add_loss` tensors apart per replica,
which the sync points of `global_sum` need (see there).

Owns: `global_sum`, `ReplicaLocalLosses`. Does not own: what is summed
(tf_moe.routing.losses, the hierarchical layer's losses).
"""

import threading

import keras


def global_sum(x):
    """x, a partial sum over this replica's tokens -> the sum over all
    replicas (x itself outside a multi-replica TF step)."""
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return x
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _replica_key():
    """The running tf.distribute replica (its thread), or None outside a
    multi-replica step."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return threading.get_ident()


class ReplicaLocalLosses:
    """Mixin for a Keras layer: the tensors of `add_loss` kept per
    tf.distribute replica.

    MirroredStrategy traces each replica's step in its own thread, one thread
    at a time, switching at every cross-replica sync point (an all-reduce, an
    on-write variable update). Keras keeps `add_loss` tensors in one list per
    layer, `_losses`, which the step clears at its start and reads at its end:
    with a sync point inside the layer (`global_sum`) another replica's step
    clears or extends the list in between, so a replica optimizes or reports
    another replica's losses. Here `_losses` is one list per replica thread
    (the one list outside a multi-replica step).
    """

    @property
    def _losses(self):
        store = self.__dict__.setdefault("_replica_losses", {})
        return store.setdefault(_replica_key(), [])

    @_losses.setter
    def _losses(self, value):
        store = self.__dict__.setdefault("_replica_losses", {})
        store[_replica_key()] = value
