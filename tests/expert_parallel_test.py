"""Expert parallelism on 8 virtual CPU devices (tf_moe.sharding, JAX).

A decoder-only Transformer-MoE (tf_moe.models.build_decoder_lm) is trained 3
steps with `model.fit` on an `ExpertParallel` mesh and on one device, from the
same initial weights and on the same batches, for every dispatch path:
losses and weights must agree. The mesh run must really be expert-parallel:
each device holds only its experts (addressable shard shapes), and the
compiled gradient step moves tokens with all-to-alls and never all-gathers
an expert weight or a dispatched buffer. Groups of `group_size` tokens divide
each device's tokens, so one device routes the same groups.

Shape letters: B batch, L length, d model dim, E experts, h hidden dim.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl.testing import absltest, parameterized  # noqa: E402

import tf_moe  # noqa: E402
from tf_moe import sharding  # noqa: E402

from expert_parallel_worker import B, D, E, GROUP, H, L, build, data, fit, model_config  # noqa: E402


def collectives(hlo):
    """{op: [result shapes]} of the collectives in compiled HLO text
    (asynchronous ones counted once, by their -start)."""
    found = {}
    for line in hlo.splitlines():
        match = re.search(r" = (.+?) (all-to-all|all-gather|all-reduce)(-start)?\(", line)
        if match:
            found.setdefault(match.group(2), []).append(match.group(1))
    return found


def grad_step_hlo(model, distribution):
    """Compiled HLO text of one gradient step of `model` on the mesh."""
    x, _ = data()
    x = jax.device_put(x[:B], distribution.get_data_layout(x[:B].shape).backend_layout)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, x):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return (logits.astype("float32") ** 2).mean()

    return jax.jit(jax.grad(loss)).lower(trainable, x).compile().as_text()


class ExpertParallelTest(parameterized.TestCase):
    def tearDown(self):
        keras.distribution.set_distribution(None)
        super().tearDown()

    def one_device(self, config):
        keras.distribution.set_distribution(None)
        model = build(config)
        initial = [np.asarray(w) for w in model.weights]
        return initial, fit(model)

    @parameterized.named_parameters(
        ("einsum", "einsum", 1.25, "batch:2,expert:4"),
        ("gather", "gather", 1.25, "batch:2,expert:4"),
        ("custom_call", "custom_call", 1.25, "batch:2,expert:4"),
        ("dropless", "custom_call", None, "batch:2,expert:4"),
        ("custom_call_model_axis", "custom_call", 1.25, "batch:2,expert:2,model:2"),
        ("einsum_experts_on_all", "einsum", 1.25, "expert:8"),
    )
    def test_matches_one_device(self, dispatch, capacity_factor, mesh):
        config = model_config(dispatch, capacity_factor)
        initial, (want_losses, want_weights) = self.one_device(config)
        distribution = sharding.expert_parallel(mesh)
        keras.distribution.set_distribution(distribution)
        model = build(config, initial)
        moe = model.get_layer("decoder_1_moe")
        plan = moe.plan(training=True)
        self.assertIsNotNone(plan.mesh)  # the sharded path, not a one-device branch
        self.assertEqual(plan.dropless, capacity_factor is None)
        sizes = distribution.mesh_sizes
        e, h = E // sizes["expert"], H // sizes["model"]
        for name, shape in (("wi", (e, D, h)), ("wo", (e, h, D)), ("bi", (e, 1, 1, h))):
            weight = moe.experts.params[name].value
            self.assertEqual(weight.addressable_shards[0].data.shape, shape, name)
        meshes, real = [], sharding.mesh_experts

        def record(num_experts):
            meshes.append(real(num_experts))
            return meshes[-1]

        with mock.patch.object(sharding, "mesh_experts", side_effect=record):
            losses, weights = fit(model)
        # fit's step was traced on the mesh: every MoE call resolved one.
        self.assertNotEmpty(meshes)
        self.assertTrue(all(mesh is not None for mesh in meshes))
        np.testing.assert_allclose(losses, want_losses, rtol=2e-5, atol=2e-5)
        self.assertLess(losses[-1], losses[0])
        for got, want, variable in zip(weights, want_weights, model.weights):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=variable.path)

        found = collectives(grad_step_hlo(model, distribution))
        self.assertIn("all-to-all", found, found)
        # Tokens move by all-to-all only: no expert weight, dispatched buffer
        # (or anything else) is all-gathered.
        self.assertNotIn("all-gather", found, found)


    @parameterized.named_parameters(
        ("expert_choice_gather", "gather", dict(router="expert_choice")),
        ("expert_choice_custom_call", "custom_call", dict(router="expert_choice")),
        ("hierarchical_gather", "gather", dict(router="hierarchical")),
        ("gated_model_axis_dropless", "custom_call",
         dict(activation="swiglu", capacity=None, mesh="batch:2,expert:2,model:2")),
    )
    def test_layers_match_one_device(self, dispatch, case):
        """The other routers and layers in a small functional model."""
        def make():
            keras.utils.set_random_seed(1)
            inputs = keras.Input((L, D))
            if case.get("router") == "hierarchical":
                layer = tf_moe.layers.HierarchicalMoE(2, 4, H, group_size=GROUP, dispatch=dispatch)
            else:
                router = (tf_moe.routing.ExpertChoiceRouter()
                          if case.get("router") == "expert_choice" else tf_moe.routing.TopKRouter(k=2))
                layer = tf_moe.layers.MoE(
                    E, H, router=router, group_size=GROUP, dispatch=dispatch,
                    capacity_factor=case.get("capacity", 1.25),
                    expert_activation=case.get("activation", "relu"),
                )
            model = keras.Model(inputs, keras.layers.Dense(D)(inputs + layer(inputs)))
            model.compile(keras.optimizers.SGD(0.5), "mse")
            return model, layer

        rng = np.random.default_rng(2)
        x = rng.normal(size=(B, L, D)).astype("float32")
        y = np.tanh(x[..., ::-1])
        results = []
        for mesh in (None, case.get("mesh", "batch:2,expert:4")):
            keras.distribution.set_distribution(mesh and sharding.expert_parallel(mesh))
            model, layer = make()
            self.assertEqual(layer.plan(True).mesh is None, mesh is None)
            history = model.fit(x, y, batch_size=B, epochs=3, verbose=0, shuffle=False)
            results.append((history.history["loss"], [np.asarray(w) for w in model.weights]))
        (want_losses, want_weights), (losses, weights) = results
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
        for got, want in zip(weights, want_weights):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    def test_checkpoint_moves_between_meshes(self):
        """Saved on batch:2,expert:4 (each process writes its shards),
        restored onto expert:8 and onto one device: the same values, laid out
        as the restoring model's variables are."""
        from trainers.checkpoint import CheckpointManager

        directory = self.create_tempdir().full_path
        config = model_config("einsum")
        results = []
        for mesh in ("batch:2,expert:4", "expert:8", None):
            keras.distribution.set_distribution(mesh and sharding.expert_parallel(mesh))
            model = build(config)
            model.optimizer.build(model.trainable_variables)
            manager = CheckpointManager(directory)
            if not results:
                fit(model)
                manager.save(3, model)
            else:
                self.assertEqual(manager.restore_latest(model), 3)
            wi = model.get_layer("decoder_1_moe").experts.wi.value
            experts_here = wi.addressable_shards[0].data.shape[0]
            self.assertEqual(experts_here, {"batch:2,expert:4": 2, "expert:8": 1, None: E}[mesh])
            results.append([np.asarray(v) for v in model.variables + model.optimizer.variables])
            manager.close()
        for restored in results[1:]:
            for got, want in zip(restored, results[0]):
                np.testing.assert_array_equal(got, want)

    def test_bad_meshes_name_the_numbers(self):
        with self.assertRaisesRegex(ValueError, r"batch x expert x model = 6.*8 devices"):
            sharding.expert_parallel("batch:2,expert:3")
        with self.assertRaisesRegex(ValueError, r"axes must be among.*'experts'"):
            sharding.expert_parallel("batch:2,experts:4")
        with self.assertRaisesRegex(ValueError, r"mesh\['expert'\]"):
            sharding.parse_mesh({"expert": 0})
        with self.assertRaisesRegex(ValueError, r"look like 'batch:2,expert:4'"):
            sharding.parse_mesh("expert=8")
        keras.distribution.set_distribution(sharding.expert_parallel("batch:2,expert:4"))
        # E not divisible by the expert axis: at the weights and at the call.
        with self.assertRaisesRegex(ValueError, r"experts \(6\) must be divisible by the mesh's 'expert' axis \(4\)"):
            tf_moe.layers.MoE(6, H, group_size=GROUP)(np.zeros((8, L, D), "float32"))
        with self.assertRaisesRegex(ValueError, r"`num_experts` \(6\) must be divisible.*'expert' axis \(4\)"):
            sharding.mesh_experts(6)
        # A batch not divisible by the 8 data shards.
        with self.assertRaisesRegex(ValueError, r"divisible by the 8 data shards.*batch size 12"):
            keras.distribution.distribution().get_data_layout((12, L))
        moe = tf_moe.layers.MoE(E, H, group_size=GROUP)
        with self.assertRaisesRegex(ValueError, r"tokens of a call \(36\).*8 data shards"):
            moe(np.zeros((3, 12, D), "float32"))


if __name__ == "__main__":
    absltest.main()
