"""Every LSTM-MoE config loads, passes the trainer's checks, and builds its
model (at reduced width, so the test stays small)."""

import copy

import numpy as np
from absl.testing import absltest, parameterized

from configs import lstm_moe_1b_word, lstm_moe_flat, lstm_moe_sweep, lstm_moe_tiny
from experiments import lstm_moe_sweep as sweep_script
from tf_moe.models import build_lstm_moe
from trainers import loop

CONFIGS = [("tiny", lstm_moe_tiny.get_config())]
CONFIGS += [(f"flat_{e}", lstm_moe_flat.get_config(str(e))) for e in lstm_moe_flat.NUM_EXPERTS]
CONFIGS += [
    (f"1b_word_{size}", lstm_moe_1b_word.get_config(size))
    for size in list(lstm_moe_1b_word.FLAT) + list(lstm_moe_1b_word.HIERARCHICAL)
]

# The one config whose build test also runs an eager forward pass.
FORWARD_CONFIG = dict(CONFIGS)["flat_256"]
HIERARCHICAL = [(name, c) for name, c in CONFIGS if c.model.hierarchical]

SWEEP = [(f"sweep_{name}", lstm_moe_sweep.get_config(name)) for name in lstm_moe_sweep.NAMES]


class LstmMoeConfigsTest(parameterized.TestCase):
    @parameterized.named_parameters(CONFIGS)
    def test_config_builds_a_model_with_the_configured_experts(self, config):
        loop.check_train_config(config.train)
        m = config.model
        m.dim, m.expert_hidden_dim = 8, 8  # the experts count is what matters
        model = build_lstm_moe(50, 6, m)
        moe = model.get_layer("moe")
        if m.hierarchical:
            self.assertEqual(
                moe.experts.num_experts, m.num_groups * m.experts_per_group
            )
            expected_fraction = m.primary_k * m.secondary_k / moe.experts.num_experts
        else:
            self.assertEqual(moe.num_experts, m.num_experts)
            self.assertEqual(moe.router.k, m.k)
            expected_fraction = m.k / m.num_experts
        self.assertAlmostEqual(moe.active_expert_fraction, expected_fraction)
        self.assertEqual(tuple(model.output.shape), (None, 6, 50))
        if config is FORWARD_CONFIG:
            # Eager forward passes compile every op per shape under JAX (most
            # of this test's time): the flat config with the most experts runs
            # one here; test_evaluation_is_causal_and_per_sequence runs the tiny
            # and a hierarchical one.
            logits = model(np.zeros((2, 6), "int32"))
            self.assertEqual(tuple(logits.shape), (2, 6, 50))

    @parameterized.named_parameters(SWEEP)
    def test_sweep_config_builds_and_counts_its_ops(self, config):
        """The FFN block's ops per timestep counted by
        experiments/lstm_moe_sweep.py equal the built model's (the dense
        FFN's kernels, or k experts' plus the gates'), checked on the
        sweep's models at 1/16 width (the count is width-generic; the full
        MoE-1024-h alone holds 1.1B parameters); at full width every model
        runs about the dense baseline's ops."""
        loop.check_train_config(config.train)
        loop.check_data_config(config.data)
        self.assertEqual(config.data.source, "token_cache")
        dense = sweep_script.ops_per_timestep(lstm_moe_sweep.get_config("dense"))
        ratio = sweep_script.ops_per_timestep(config) / dense
        if config.model.get("dense_ffn_hidden_dim") == 16384:
            self.assertAlmostEqual(ratio, 2.5)  # the wide baseline: 4x the FFN's ops
        else:
            self.assertBetween(ratio, 1.0, 1.07)  # the gates add at most 7%

        m = copy.deepcopy(config.model)
        m.dim //= 16
        m.expert_hidden_dim //= 16
        if m.get("dense_ffn_hidden_dim") is not None:
            m.dense_ffn_hidden_dim //= 16
        model = build_lstm_moe(64, 4, m)
        if m.get("dense_ffn_hidden_dim") is not None:
            kernels = [w for w in model.get_layer("dense_ffn").weights if len(w.shape) == 2]
            expected = sum(int(np.prod(w.shape)) for w in kernels)
            self.assertEqual(expected, 2 * m.dim * m.dense_ffn_hidden_dim)
        else:
            weights = {w.path: tuple(w.shape) for w in model.get_layer("moe").weights}
            wi, wo = weights["moe/experts/wi"], weights["moe/experts/wo"]
            per_expert = int(np.prod(wi[1:]) + np.prod(wo[1:]))  # [E, d, h], [E, h, d]
            self.assertEqual(per_expert, 2 * m.dim * m.expert_hidden_dim)
            if m.hierarchical:
                self.assertEqual(wi[0], m.num_groups * m.experts_per_group)
                # Each token runs the primary gate ([d, G]) and, for each of
                # its primary_k groups, one group's secondary gate ([G, d, n]).
                gate_macs = 0
                for name in ("kernel", "noise_kernel"):
                    gate_macs += int(np.prod(weights[f"moe/primary_router/{name}"]))
                    secondary = weights[f"moe/secondary_router/{name}"]
                    gate_macs += m.primary_k * int(np.prod(secondary[1:]))
                active = m.primary_k * m.secondary_k
            else:
                self.assertEqual(wi[0], m.num_experts)
                gate_macs = sum(int(np.prod(weights[f"moe/router/{name}"]))
                                for name in ("kernel", "noise_kernel"))
                active = m.k
            expected = active * per_expert + gate_macs
        self.assertEqual(sweep_script.ffn_block_macs(m), expected)

    def test_sweep_rejects_an_unknown_name(self):
        with self.assertRaisesRegex(ValueError, r"name in \('dense'.*Received: name='moe8'"):
            lstm_moe_sweep.get_config("moe8")

    @parameterized.named_parameters(CONFIGS[:1] + HIERARCHICAL[:1])
    def test_evaluation_is_causal_and_per_sequence(self, config):
        """With the config's evaluation settings, logits at positions < t do
        not change when tokens >= t do, nor a sequence's when its batch-mates
        change (the LSTMs are causal; the MoE must not couple tokens)."""
        import keras

        m = config.model
        m.dim, m.expert_hidden_dim, m.group_size = 8, 8, 64
        keras.utils.set_random_seed(0)
        model = build_lstm_moe(50, 12, m)
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, 50, (4, 12)).astype("int32")
        logits = np.asarray(model(tokens, training=False))
        future, mates = tokens.copy(), tokens.copy()
        future[:, 8:] = rng.integers(1, 50, (4, 4))
        mates[1:] = rng.integers(1, 50, (3, 12))
        np.testing.assert_array_equal(np.asarray(model(future, training=False))[:, :8],
                                      logits[:, :8])
        np.testing.assert_array_equal(np.asarray(model(mates, training=False))[0], logits[0])

    @parameterized.parameters("mixed_bfloat16", "mixed_float16")
    def test_mixed_precision_keeps_lstms_and_softmax_in_float32(self, policy):
        """Under a mixed policy (train.dtype_policy) the LSTMs and the softmax
        compute in float32 (cuDNN's RNN on JAX GPUs rejects bfloat16), the
        rest in the reduced dtype; the model trains with finite losses."""
        import keras

        config = lstm_moe_tiny.get_config()
        config.train.dtype_policy = policy
        m = config.model
        m.dim, m.expert_hidden_dim, m.group_size = 16, 16, 64
        keras.utils.set_random_seed(0)
        try:
            loop.set_dtype_policy(config.train)
            model = build_lstm_moe(50, 12, m)
            model.compile(keras.optimizers.Adam(1e-2),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=True)
            tokens = np.random.default_rng(0).integers(1, 50, (8, 13)).astype("int32")
            history = model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=4, epochs=3,
                                verbose=0)
        finally:
            keras.config.set_dtype_policy("float32")
        reduced = policy.removeprefix("mixed_")
        for name in ("lstm_1", "lstm_2", "softmax"):
            self.assertEqual(model.get_layer(name).compute_dtype, "float32", name)
        self.assertEqual(model.get_layer("moe").compute_dtype, reduced)
        self.assertEqual(model.get_layer("embedding").compute_dtype, reduced)
        self.assertEqual(keras.backend.standardize_dtype(model(tokens[:2, :-1]).dtype), "float32")
        losses = history.history["loss"]
        self.assertTrue(np.isfinite(losses).all(), losses)
        self.assertLess(losses[-1], losses[0])

    def test_flat_family_has_fixed_active_expert_parameters(self):
        active = set()
        for e in lstm_moe_flat.NUM_EXPERTS:
            m = lstm_moe_flat.get_config(str(e)).model
            active.add(m.k * m.expert_hidden_dim * m.dim)
        self.assertLen(active, 1)

    @parameterized.parameters(
        (lstm_moe_flat.get_config, "3", "num_experts"),
        (lstm_moe_1b_word.get_config, "77", "size"),
    )
    def test_bad_config_argument(self, get_config, argument, name):
        with self.assertRaisesRegex(ValueError, name):
            get_config(argument)


if __name__ == "__main__":
    absltest.main()
