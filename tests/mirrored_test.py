"""Data parallelism on TensorFlow: `tf.distribute.MirroredStrategy` over 2
logical CPU devices (TPUStrategy and MultiWorkerMirroredStrategy share the
mechanism) must train exactly like one device on the same global batch:
losses, the auxiliary losses (computed on the global batch through
`tf_moe._replicas.global_sum`) and every weight after 3 steps.

Without the fixes in tf_moe/_replicas.py the router's update was about half
the one-device one: an on-write statistics variable or an all-reduce inside
the layer let one replica's step clear or read another's `add_loss` list.
XLA stays off: TF cannot compile a MirroredStrategy step over logical CPU
devices ("Trying to access resource ... located in device CPU:1 from device
CPU:0", plain Keras layers too).
"""

import tensorflow as tf

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl.testing import absltest, parameterized  # noqa: E402

import tf_moe  # noqa: E402
from trainers import loop  # noqa: E402
from expert_parallel_worker import B, D, H, L, build, fit, model_config  # noqa: E402

# One strategy for the module: a second MirroredStrategy in the process got
# its collectives' instance keys mixed with the first's ("Shape mismatch in
# the collective instance ...", TF 2.21).
STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def aux_losses(model):
    """{layer/loss: value} of every MoE layer's weighted auxiliary losses."""
    return {
        f"{layer.name}/{name}": float(layer.last_routing_stats[name])
        for layer in tf_moe.metrics.moe_layers(model)
        for name in layer.loss_names
    }


class MirroredTest(parameterized.TestCase):
    def test_trainers_leave_xla_off_on_cpu_replicas(self):
        """train.jit_compile unset: XLA on one device, none under the
        2-CPU strategy; an explicit True there is a config error naming it."""
        self.assertIs(loop.resolve_jit_compile(None), True)
        self.assertIs(loop.resolve_jit_compile(False), False)
        with STRATEGY.scope():
            self.assertIs(loop.resolve_jit_compile(None), False)
            self.assertIs(loop.resolve_jit_compile(False), False)
            with self.assertRaisesRegex(loop.ConfigError,
                                        r"train\.jit_compile.*Received: train\.jit_compile=True"):
                loop.resolve_jit_compile(True)

    @parameterized.named_parameters(("gather", "gather"), ("custom_call", "custom_call"))
    def test_transformer_matches_one_device(self, dispatch):
        # Strong aux losses, so that a wrong one shows in every weight.
        config = model_config(dispatch, balance_loss_weight=0.5, z_loss_weight=0.1)
        results = []
        for strategy in (None, STRATEGY):
            with (strategy or tf.distribute.get_strategy()).scope():
                model = build(config, jit_compile=False)
            losses, weights = fit(model)
            results.append((losses, weights, aux_losses(model)))
        (want, want_weights, want_aux), (got, weights, aux) = results
        self.assertEqual(model.distribute_strategy.num_replicas_in_sync, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        self.assertCountEqual(aux, want_aux)
        for name, value in want_aux.items():
            self.assertGreater(value, 0.0, name)
            np.testing.assert_allclose(aux[name], value, rtol=1e-4, err_msg=name)
        for got_w, want_w, variable in zip(weights, want_weights, model.weights):
            np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-4, err_msg=variable.path)

    def test_hierarchical_and_noisy_losses_are_global(self):
        """Importance/load losses (CV^2 of per-expert sums) and the
        hierarchical ones, through `global_sum`, in evaluation (the noisy
        gates draw their noise per replica in training)."""
        rng = np.random.default_rng(3)
        x = rng.normal(size=(B, L, D)).astype("float32")
        y = np.tanh(x[..., ::-1])
        gates = {}
        results = []
        for strategy in (None, STRATEGY):
            with (strategy or tf.distribute.get_strategy()).scope():
                keras.utils.set_random_seed(2)
                inputs = keras.Input((L, D))
                hierarchical = tf_moe.layers.HierarchicalMoE(
                    3, 2, H, primary_k=1, group_size=16, importance_loss_weight=1.0,
                    load_loss_weight=1.0, name="hierarchical",
                )
                flat = tf_moe.layers.MoE(
                    4, H, router=tf_moe.routing.NoisyTopKRouter(k=2), group_size=16, name="flat"
                )
                h = inputs + hierarchical(inputs)
                model = keras.Model(inputs, keras.layers.Dense(D)(h + flat(h)))
                for v in model.trainable_weights:  # nonzero (same) gates
                    if "router" in v.path:
                        gates.setdefault(v.path, np.random.default_rng(len(gates)).normal(
                            0, 0.3, v.shape).astype("float32"))
                        v.assign(gates[v.path])
                model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=False)
            loss = model.evaluate(x, y, batch_size=B, verbose=0)
            results.append((loss, aux_losses(model)))
        (want, want_aux), (got, aux) = results
        self.assertLen(want_aux, 6)  # 4 hierarchical, 2 noisy
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for name, value in want_aux.items():
            self.assertGreater(value, 0.0, name)
            np.testing.assert_allclose(aux[name], value, rtol=1e-4, err_msg=name)


    def test_clipping_clips_the_sum_of_the_replicas(self):
        """trainers.loop.ClipsTheSum: Keras clips each replica's gradient
        before summing them (asserted, so that a Keras that stops doing so
        shows here); with the mixin, the sum is clipped, as on one device."""
        from trainers.loop import ClipsTheSum

        class SGD(ClipsTheSum, keras.optimizers.SGD):
            pass

        rng = np.random.default_rng(5)
        x = rng.normal(size=(8, 4)).astype("float32")
        y = np.arange(8) % 3

        def train(optimizer, strategy):
            with (strategy or tf.distribute.get_strategy()).scope():
                keras.utils.set_random_seed(0)
                inputs = keras.Input((4,))
                h = keras.layers.Dense(5, activation="tanh")(inputs)
                model = keras.Model(inputs, keras.layers.Dense(3)(h))
                model.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), jit_compile=False)
            model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
            return [np.asarray(w) for w in model.weights]

        for optimizer, same in ((lambda: SGD(1.0, clipnorm=0.01), True),
                                (lambda: keras.optimizers.SGD(1.0, clipnorm=0.01), False)):
            one, two = train(optimizer, None), train(optimizer, STRATEGY)
            differences = [np.abs(a - b).max() for a, b in zip(one, two)]
            if same:
                np.testing.assert_allclose(differences, 0.0, atol=1e-6)
            else:
                self.assertGreater(max(differences), 1e-4)


if __name__ == "__main__":
    absltest.main()
