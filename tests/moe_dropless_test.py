"""Tests for the dropless `MoE` (capacity_factor=None on the custom-call path).

A dropless layer routes with C = S (nothing overflows) and runs the experts
on expert-sorted rows with grouped matmuls (tf_moe.ops.dropless), so it must
compute exactly the function of the capacity path with C = S: the reference
here is the same layer on the "gather" path (itself checked against a numpy
layer in moe_test.py), compared in outputs, input gradients and the gradients
of every trainable weight (router included), eagerly and compiled, and in
`model.fit`. Needs the Bazel-built custom-call libraries (data deps).

Shape letters: B batch, L length, d model dim, E experts, h hidden dim.
"""

import os
import tempfile
from unittest import mock

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.layers import MoE
from tf_moe.ops import custom_call, dropless
from tf_moe.ops import dispatch as dispatch_lib
from tf_moe.routing import ExpertChoiceRouter, NoisyTopKRouter, TopKRouter

E, D, H = 4, 8, 16
NORMAL = keras.initializers.RandomNormal(stddev=1.0)
BACKEND = keras.backend.backend()


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float64)


def random_array(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def make_pair(router_factory, seed=0, **kwargs):
    """(dropless layer, gather layer with C = S) with equal weights and
    nonzero expert biases."""
    kwargs.setdefault("group_size", 8)
    kwargs.setdefault("capacity_factor", None)
    kwargs.setdefault("eval_capacity_factor", None)
    layers = []
    for dispatch in ("custom_call", "gather"):
        layer = MoE(E, H, router=router_factory(), dispatch=dispatch, **kwargs)
        layer.build((2, 8, D))
        layers.append(layer)
    for v in layers[0].weights:
        if "experts/b" in v.path:
            v.assign(random_array(seed + 100, v.shape) * 0.3)
    layers[1].set_weights(layers[0].get_weights())
    return layers


def grads_of(layer, x, cotangent, training, compiled):
    """(y, d loss / d x, [d loss / d w]) for loss = <y, cot> + aux losses."""
    trainable = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
                loss = ops.sum(ops.cast(y, "float32") * cotangent) + ops.sum(layer.losses)
            return y, tape.gradient(loss, [x] + trainable)

        if compiled:
            step = tf.function(step, jit_compile=True)
        y, (dx, *dw) = step(tf.convert_to_tensor(x))
    else:
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(x, values):
            y, non_trainable_out, losses = layer.stateless_call(
                values, non_trainable, x, training=training, return_losses=True
            )
            loss = ops.sum(ops.cast(y, "float32") * cotangent) + ops.sum(losses)
            return loss, (y, non_trainable_out)

        fn = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)
        if compiled:
            fn = jax.jit(fn)
        (_, (y, stats)), (dx, dw) = fn(ops.convert_to_tensor(x), [v.value for v in trainable])
        # Keep the routing statistics of this call, as an eager call would.
        for variable, value in zip(layer.non_trainable_variables, stats):
            variable.assign(value)
    # None (TF: a weight the loss does not depend on, e.g. the noise kernel
    # at inference) is compared as such.
    return to_numpy(y), to_numpy(dx), [None if g is None else to_numpy(g) for g in dw]


class DroplessMoETest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self._policy = keras.config.dtype_policy()

    def tearDown(self):
        keras.config.set_dtype_policy(self._policy)
        super().tearDown()

    @parameterized.named_parameters(
        ("top1_relu", lambda: TopKRouter(k=1, kernel_initializer=NORMAL), "relu", True),
        ("top2_swiglu", lambda: TopKRouter(k=2, kernel_initializer=NORMAL), "swiglu", True),
        ("top2_normalized_gelu", lambda: TopKRouter(
            k=2, normalize_weights=True, kernel_initializer=NORMAL), "gelu", True),
        ("noisy_top2_eval", lambda: NoisyTopKRouter(k=2), "relu", False),
    )
    def test_equals_gather_with_capacity_s(self, router_factory, activation, training):
        moe, reference = make_pair(router_factory, expert_activation=activation)
        self.assertTrue(moe.runs_dropless(training))
        self.assertFalse(reference.runs_dropless(training))
        if isinstance(moe.router, NoisyTopKRouter):
            for layer in (moe, reference):
                layer.router.kernel.assign(random_array(3, layer.router.kernel.shape))
        x = random_array(1, (3, 7, D))  # 21 tokens: groups 8, 8, 5 + padding
        cot = random_array(2, (3, 7, D))
        compiled = BACKEND == "jax"  # eager JAX is slow; compiled TF below
        y, dx, dw = grads_of(moe, x, cot, training, compiled)
        y_ref, dx_ref, dw_ref = grads_of(reference, x, cot, training, compiled)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
        self.assertEqual(len(dw), len(dw_ref))
        for v, g, g_ref in zip(moe.trainable_variables, dw, dw_ref):
            if g is None or g_ref is None:
                self.assertEqual((g is None, g_ref is None), (True, True), v.path)
                self.assertIn("noise_kernel", v.path)  # only unused at inference
                continue
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=v.path)
            if "noise_kernel" not in v.path or training:
                self.assertGreater(np.abs(g).max(), 0.0, v.path)
        self.assertEqual(float(moe.last_routing_stats["dropped_fraction"]), 0.0)

    def test_compiled_equals_eager(self):
        moe, _ = make_pair(lambda: TopKRouter(k=2, kernel_initializer=NORMAL))
        x = random_array(4, (2, 9, D))
        cot = random_array(5, (2, 9, D))
        eager = grads_of(moe, x, cot, training=True, compiled=False)
        compiled = grads_of(moe, x, cot, training=True, compiled=True)
        np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-5, atol=1e-5)
        self.assertTrue(all(g is not None for g in compiled[2]))
        for g, g_eager in zip(compiled[2], eager[2]):
            np.testing.assert_allclose(g, g_eager, rtol=1e-4, atol=1e-5)

    def test_takes_the_dropless_path_only_without_capacity(self):
        x = random_array(6, (2, 8, D))
        moe = MoE(E, H, capacity_factor=1.25, eval_capacity_factor=None,
                  dispatch="custom_call", group_size=8)
        moe.build(x.shape)
        self.assertFalse(moe.runs_dropless(training=True))
        self.assertTrue(moe.runs_dropless(training=False))
        kernels = mock.Mock(wraps=custom_call.custom_call_dispatch)
        combine = dispatch_lib.DISPATCHERS["custom_call"][1]
        # The capacity path finds the kernel in DISPATCHERS, dropless in the module.
        with mock.patch.object(dropless, "dispatch_rows", wraps=dropless.dispatch_rows) as spy, \
                mock.patch.object(custom_call, "custom_call_dispatch", kernels), \
                mock.patch.dict(dispatch_lib.DISPATCHERS, {"custom_call": (kernels, combine)}):
            moe(x, training=True)
            self.assertEqual((spy.call_count, kernels.call_count), (0, 1))
            moe(x, training=False)
            # The rows move through the custom-call kernels too (N static).
            self.assertEqual((spy.call_count, kernels.call_count), (1, 2))
        # Expert choice: capacity is its routing rule, so None keeps C = S.
        expert_choice = MoE(E, H, router=ExpertChoiceRouter(), capacity_factor=None,
                            dispatch="custom_call", group_size=8)
        expert_choice.build(x.shape)
        self.assertFalse(expert_choice.runs_dropless(training=True))
        # einsum/gather: None means C = S buffers.
        for dispatch in ("einsum", "gather"):
            layer = MoE(E, H, capacity_factor=None, dispatch=dispatch)
            self.assertFalse(layer.runs_dropless(training=True))

    def test_every_token_to_one_expert(self):
        # Expert 0 gets every token's first choice: with capacity its segment
        # would overflow any factor below E / k; dropless keeps all of them.
        moe, reference = make_pair(lambda: TopKRouter(k=2))
        x = np.abs(random_array(7, (2, 8, D))) + 0.1
        for layer in (moe, reference):
            kernel = np.zeros((D, E), np.float32)
            kernel[:, 0], kernel[:, 1] = 1.0, 0.5
            layer.router.kernel.assign(kernel)
        y, _, _ = grads_of(moe, x, random_array(8, x.shape), True, BACKEND == "jax")
        y_ref, _, _ = grads_of(reference, x, random_array(8, x.shape), True, BACKEND == "jax")
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(moe.last_routing_stats["expert_load"], [0.5, 0.5, 0, 0])

    def test_mixed_bfloat16(self):
        x = random_array(9, (2, 8, D))
        x = to_numpy(ops.cast(x, "bfloat16")).astype(np.float32)
        _, reference = make_pair(lambda: TopKRouter(k=2, kernel_initializer=NORMAL))
        y32 = to_numpy(reference(x))
        keras.config.set_dtype_policy("mixed_bfloat16")
        moe = MoE(E, H, router=TopKRouter(k=2), capacity_factor=None,
                  eval_capacity_factor=None, dispatch="custom_call", group_size=8)
        moe.build(x.shape)
        moe.set_weights(reference.get_weights())
        self.assertTrue(moe.runs_dropless(training=False))
        y = moe(x)
        self.assertEqual(ops.dtype(y), "bfloat16")
        scale = np.abs(y32).max()
        np.testing.assert_allclose(to_numpy(y), y32, rtol=2e-2, atol=2e-2 * scale)
        self.assertGreater(np.abs(to_numpy(y) - y32).max(), 0.0)  # really bf16

    def test_fit_and_keras_round_trip(self):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4, D))
        moe = MoE(E, H, router=TopKRouter(k=2), capacity_factor=None,
                  eval_capacity_factor=None, dispatch="custom_call", group_size=8,
                  name="moe")
        model = keras.Model(inputs, keras.layers.Dense(D)(moe(inputs)))
        model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=True)
        x = random_array(10, (20, 4, D))
        y = np.tanh(x[..., ::-1] * 2.0)
        before = [to_numpy(v) for v in moe.trainable_variables]
        losses = model.fit(x, y, batch_size=8, epochs=3, verbose=0).history["loss"]
        self.assertTrue(np.all(np.isfinite(losses)))
        self.assertLess(losses[-1], losses[0])
        for v, b in zip(moe.trainable_variables, before):
            self.assertGreater(np.abs(to_numpy(v) - b).max(), 0.0, v.path)
        self.assertEqual(float(moe.last_routing_stats["dropped_fraction"]), 0.0)
        path = os.path.join(tempfile.mkdtemp(), "dropless.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertTrue(loaded.get_layer("moe").runs_dropless(training=True))
        np.testing.assert_allclose(to_numpy(loaded(x[:8])), to_numpy(model(x[:8])),
                                   rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    absltest.main()
