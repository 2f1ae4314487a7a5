"""Exported MoE models serve without tf_moe: a TF SavedModel from
`model.export()` loads and runs in a fresh process with plain TensorFlow
(no tf_moe import, no op library), and `jax.export` of a model under
`tf_moe.ops.portable()` takes a symbolic batch; outputs equal the model's.
The libraries are built (data deps), so "auto" would pick the custom calls
outside these programs.
"""

import os
import subprocess
import sys

import keras
import numpy as np
from absl.testing import absltest, parameterized

import tf_moe


def make_model(capacity, router):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16))
    # One routing group per sequence: no sequence depends on its batch-mates.
    moe = tf_moe.layers.MoE(4, 32, router=router(), group_size=8,
                            eval_capacity_factor=capacity, name="moe")
    return keras.Model(inputs, keras.layers.Dense(16)(inputs + moe(inputs)))


CASES = (
    ("top2_capacity", 2.0, lambda: tf_moe.routing.TopKRouter(k=2)),
    ("top2_dropless", None, lambda: tf_moe.routing.TopKRouter(k=2)),
    ("expert_choice", 1.0, lambda: tf_moe.routing.ExpertChoiceRouter()),
)


class ExportTest(parameterized.TestCase):
    @parameterized.named_parameters(*CASES)
    def test_export_serves(self, capacity, router):
        model = make_model(capacity, router)
        x = np.random.default_rng(1).normal(size=(3, 8, 16)).astype("float32")
        want = np.asarray(model(x))
        self.assertTrue(model.get_layer("moe").plan(False).path in ("custom_call", "gather"))
        if keras.backend.backend() == "tensorflow":
            self.check_saved_model(model, x, want)
        else:
            self.check_jax_export(model, x, want)

    def check_saved_model(self, model, x, want):
        folder = self.create_tempdir().full_path
        model.export(folder, verbose=False)
        np.save(os.path.join(folder, "x.npy"), x)
        # A fresh interpreter that imports TensorFlow and nothing of tf_moe.
        code = (
            "import sys, numpy as np, tensorflow as tf\n"
            f"folder = {folder!r}\n"
            "loaded = tf.saved_model.load(folder)\n"
            "served = loaded.serve(np.load(folder + '/x.npy')).numpy()\n"
            "assert 'tf_moe' not in sys.modules\n"
            "np.save(folder + '/y.npy', served)\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "TF_MOE_OPS_DIR"}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                text=True, env=env, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        np.testing.assert_allclose(np.load(os.path.join(folder, "y.npy")), want,
                                   rtol=1e-5, atol=1e-5)

    def check_jax_export(self, model, x, want):
        import jax
        from jax import export

        def serve(x):
            return model(x, training=False)

        with tf_moe.ops.portable():
            (batch,) = export.symbolic_shape("b")
            exported = export.export(jax.jit(serve))(
                jax.ShapeDtypeStruct((batch, 8, 16), "float32"))
        restored = export.deserialize(exported.serialize())
        np.testing.assert_allclose(np.asarray(restored.call(x)), want, rtol=1e-5, atol=1e-5)
        # Another batch size through the same exported program.
        np.testing.assert_allclose(np.asarray(restored.call(x[:1])), want[:1],
                                   rtol=1e-5, atol=1e-5)

    def test_portable_refuses_explicit_custom_calls(self):
        layer = tf_moe.layers.MoE(4, 32, dispatch="custom_call")
        with tf_moe.ops.portable():
            with self.assertRaisesRegex(ValueError, "cannot be exported as a portable program"):
                layer.plan(training=False)


if __name__ == "__main__":
    absltest.main()
