"""Tests for tf_moe.models.transformer_moe and tf_moe.models.decoding.

References written here, independently of the library:
  - causality: logits at positions < t do not change when tokens >= t do
    (and do change at t, so the check can fail);
  - padding: the same source padded to two different lengths gives the same
    decoder logits (encoder self-attention and cross-attention ignore PAD);
    replacing a PAD by a real token changes them;
  - MoE placement: blocks moe_every - 1, 2 * moe_every - 1, ... (0-based);
  - the FFN, the sinusoidal table: numpy formulas;
  - decoding: a hand-made next-token distribution (a pure function of the
    prefix) and brute-force enumeration of every sequence of a tiny
    vocabulary up to a tiny length, scored log P(Y) / ((5 + |Y|) / 6)^alpha.

MoE layers are evaluated dropless (eval_capacity_factor=None): with a
capacity limit, a later token can take an expert slot that an earlier token's
second choice needed, which is a property of token-choice routing, not of
the attention masks tested here.

Shape letters: B batch, L length, S source length, d model dim, V vocabulary.
"""

import inspect
import itertools
import math

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops
from ml_collections import config_dict

from tf_moe.layers import MoE
from tf_moe.models import build_decoder_lm, build_encoder_decoder, decoding
from tf_moe.models.transformer_moe import (
    FeedForward,
    PositionEmbedding,
    sinusoidal_table,
)

V = 23
PAD, BOS, EOS = 0, 2, 3

# Router settings of the three recipes (configs/switch_base.py, gshard.py,
# st_moe.py).
ROUTERS = {
    "switch": dict(k=1, second_expert_policy="all", normalize_weights=False,
                   z_loss_weight=0.0, expert_activation="relu"),
    "gshard": dict(k=2, second_expert_policy="random", normalize_weights=True,
                   z_loss_weight=0.0, expert_activation="relu"),
    "st_moe": dict(k=2, second_expert_policy="all", normalize_weights=False,
                   z_loss_weight=1e-3, expert_activation="geglu"),
}


def model_config(router="gshard", **overrides):
    config = dict(
        dim=16, num_heads=2, num_layers=4, ffn_hidden_dim=24, ffn_activation="relu",
        dropout=0.0, position="learned", moe_every=2, num_experts=4,
        second_expert_policy="all", normalize_weights=False,
        batch_prioritized_routing=False, balance_loss_weight=1e-2, jitter_noise=0.0,
        expert_hidden_dim=24, expert_dropout=0.0, capacity_factor=1.25,
        eval_capacity_factor=None, group_size=64, dispatch="auto",
    )
    config.update(ROUTERS[router])
    config.update(overrides)
    return config_dict.ConfigDict(config)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def random_tokens(seed, shape, low=4):
    return np.random.default_rng(seed).integers(low, V, shape).astype("int32")


class ModelTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(1)

    @parameterized.named_parameters(
        (name, name, position)
        for name, position in (("switch", "learned"), ("gshard", "sinusoidal"),
                               ("st_moe", "learned"))
    )
    def test_decoder_lm_is_causal(self, router, position):
        length, t = 10, 6
        model = build_decoder_lm(V, length, model_config(router, position=position))
        tokens = random_tokens(0, (3, length))
        changed = tokens.copy()
        changed[:, t:] = random_tokens(1, (3, length - t))
        before = to_numpy(model(tokens, training=False))  # [B, L, V]
        after = to_numpy(model(changed, training=False))
        np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=1e-5, atol=1e-5)
        self.assertGreater(np.abs(after[:, t] - before[:, t]).max(), 1e-3)

    @parameterized.named_parameters(("switch", "switch"), ("st_moe", "st_moe"))
    def test_encoder_decoder_decoder_is_causal(self, router):
        length, t = 8, 3
        model = build_encoder_decoder(V, length, model_config(router))
        source = random_tokens(2, (2, length))
        target = random_tokens(3, (2, length))
        changed = target.copy()
        changed[:, t:] = random_tokens(4, (2, length - t))
        before = to_numpy(model({"source": source, "target_in": target}, training=False))
        after = to_numpy(model({"source": source, "target_in": changed}, training=False))
        np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=1e-5, atol=1e-5)
        self.assertGreater(np.abs(after[:, t] - before[:, t]).max(), 1e-3)

    def test_source_padding_does_not_change_outputs(self):
        # Sinusoidal positions hold no weights, so models for two max lengths
        # share every weight shape.
        config = model_config("st_moe", position="sinusoidal")
        short = build_encoder_decoder(V, 6, config, pad_id=PAD)
        long = build_encoder_decoder(V, 11, config, pad_id=PAD)
        long.set_weights(short.get_weights())
        words = random_tokens(5, (2, 4))
        target = random_tokens(6, (2, 6))

        def logits(model, source, target):
            return to_numpy(model({"source": source, "target_in": target}, training=False))

        def padded(length):
            return np.pad(words, [(0, 0), (0, length - 4)], constant_values=PAD)

        reference = logits(short, padded(6), target)  # [B, 6, V]
        longer = logits(long, padded(11), np.pad(target, [(0, 0), (0, 5)]))[:, :6]
        np.testing.assert_allclose(longer, reference, rtol=1e-5, atol=1e-5)
        # Control: a real token in place of a PAD changes the outputs.
        source = padded(6)
        source[:, 5] = 7
        self.assertGreater(np.abs(logits(short, source, target) - reference).max(), 1e-3)

    @parameterized.named_parameters(
        ("every_other", 4, 2, [1, 3]), ("every_third", 6, 3, [2, 5]), ("every", 2, 1, [0, 1])
    )
    def test_moe_placement(self, num_layers, moe_every, expected):
        config = model_config(num_layers=num_layers, moe_every=moe_every)
        stacks = {
            "decoder_lm": (build_decoder_lm(V, 5, config), ["decoder"]),
            "encoder_decoder": (build_encoder_decoder(V, 5, config), ["encoder", "decoder"]),
        }
        for label, (model, prefixes) in stacks.items():
            layers = {layer.name: layer for layer in model._flatten_layers()}
            for prefix in prefixes:
                for i in range(num_layers):
                    with self.subTest(model=label, block=f"{prefix}_{i}"):
                        moe = layers.get(f"{prefix}_{i}_moe")
                        dense = layers.get(f"{prefix}_{i}_ffn")
                        if i in expected:
                            self.assertIsInstance(moe, MoE)
                            self.assertIsNone(dense)
                        else:
                            self.assertIsInstance(dense, FeedForward)
                            self.assertIsNone(moe)

    @parameterized.named_parameters(("gshard", "gshard", ()), ("st_moe", "st_moe", ("z_loss",)))
    def test_aux_losses_are_added(self, router, extra):
        model = build_encoder_decoder(V, 6, model_config(router))
        inputs = {"source": random_tokens(7, (3, 6)), "target_in": random_tokens(8, (3, 6))}
        model(inputs, training=True)
        moe_layers = [layer for layer in model._flatten_layers() if isinstance(layer, MoE)]
        self.assertLen(moe_layers, 4)  # 2 encoder + 2 decoder blocks of 4
        self.assertLen(model.losses, 4)
        expected = 0.0
        for layer in moe_layers:
            stats = layer.last_routing_stats
            for name in ("balance_loss",) + extra:
                self.assertGreater(float(stats[name]), 0.0, msg=f"{layer.name}/{name}")
                expected += float(stats[name])
            if not extra:
                self.assertNotIn("z_loss", stats)
        total = sum(float(to_numpy(loss)) for loss in model.losses)
        np.testing.assert_allclose(total, expected, rtol=1e-5)

    def test_sinusoidal_table_matches_formula(self):
        table = sinusoidal_table(7, 6)
        for p in range(7):
            for i in range(3):
                angle = p / 10000 ** (2 * i / 6)
                self.assertAlmostEqual(float(table[p, 2 * i]), math.sin(angle), places=6)
                self.assertAlmostEqual(float(table[p, 2 * i + 1]), math.cos(angle), places=6)

    @parameterized.named_parameters(("relu", "relu"), ("geglu", "geglu"))
    def test_feed_forward_matches_numpy(self, activation):
        layer = FeedForward(5, activation)
        x = np.random.default_rng(9).normal(size=(2, 3, 4)).astype("float32")
        y = to_numpy(layer(x))
        wi, bi = (to_numpy(w) for w in layer.wi.weights)
        wo, bo = (to_numpy(w) for w in layer.wo.weights)
        hidden = x @ wi + bi
        if activation == "relu":
            hidden = np.maximum(hidden, 0.0)
        else:
            wg, bg = (to_numpy(w) for w in layer.wi_gate.weights)
            g = x @ wg + bg
            # tanh-approximate GELU, the default of keras.ops.gelu.
            gelu = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
            hidden = gelu * hidden
        np.testing.assert_allclose(y, hidden @ wo + bo, rtol=1e-5, atol=1e-5)

    def test_layers_round_trip_every_argument(self):
        cases = [
            (PositionEmbedding, dict(max_length=9, kind="sinusoidal")),
            (FeedForward, dict(hidden_dim=7, activation="swiglu", dropout=0.25)),
        ]
        for cls, arguments in cases:
            names = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
            self.assertEqual(names, set(arguments))
            config = cls(**arguments).get_config()
            self.assertEqual({name: config[name] for name in names}, arguments)
            self.assertEqual(cls.from_config(config).get_config(), config)

    def test_bad_model_config_names_the_field(self):
        with self.assertRaisesRegex(ValueError, r"model\.num_heads"):
            build_decoder_lm(V, 5, model_config(dim=15, num_heads=2))
        with self.assertRaisesRegex(ValueError, r"model\.position.*'rotary'"):
            build_decoder_lm(V, 5, model_config(position="rotary"))
        with self.assertRaisesRegex(ValueError, r"model\.moe_every.*0"):
            build_encoder_decoder(V, 5, model_config(moe_every=0))


# ----------------------------------------------------------------------------
# Decoding against hand-made distributions and brute force.


def table_logits_fn(vocab, seed):
    """A deterministic "model": the next-token logits are a pseudo-random
    function of the whole prefix (BOS .. position t)."""

    def next_logits(prefix):
        rng = np.random.default_rng([seed, *prefix])
        return rng.normal(scale=2.0, size=vocab)

    def logits_fn(tokens, t):
        tokens = to_numpy(tokens)
        return np.stack(
            [next_logits(tuple(int(x) for x in row[: t + 1])) for row in tokens]
        ).astype(np.float32)  # [N, V]

    return logits_fn, next_logits


def log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def brute_force_best(next_logits, vocab, max_length, alpha):
    """The EOS-terminated sequence of <= max_length tokens maximizing
    log P / ((5 + |Y|) / 6)^alpha, by enumeration."""
    best, best_score = None, -np.inf
    for length in range(1, max_length + 1):
        for body in itertools.product([v for v in range(vocab) if v != EOS], repeat=length - 1):
            sequence = (*body, EOS)
            logp = sum(
                log_softmax(next_logits((BOS, *sequence[:i])))[sequence[i]] for i in range(length)
            )
            score = logp / ((5.0 + length) / 6.0) ** alpha
            if score > best_score:
                best, best_score = sequence, score
    return best, best_score


def fixed_distribution_fn(table, vocab):
    """logits_fn from a dict prefix-tuple (after BOS) -> probabilities; any
    prefix not in the table gets a uniform distribution."""

    def logits_fn(tokens, t):
        tokens = to_numpy(tokens)
        uniform = np.ones(vocab) / vocab
        return np.stack(
            [np.log(table.get(tuple(int(x) for x in row[1 : t + 1]), uniform)) for row in tokens]
        ).astype(np.float32)  # [N, V]

    return logits_fn


class DecodingTest(parameterized.TestCase):
    def test_beam_of_one_without_length_penalty_equals_greedy(self):
        logits_fn, _ = table_logits_fn(vocab=6, seed=3)
        greedy = to_numpy(decoding.greedy_search(logits_fn, 4, 7))
        beam, _ = decoding.beam_search(logits_fn, 4, 7, beam_size=1, alpha=0.0)
        np.testing.assert_array_equal(to_numpy(beam), greedy)

    def test_greedy_stops_at_eos_and_pads(self):
        # After BOS: EOS is certain at step 2 (prefix (4, 4)); token 4 before.
        table = {(): np.array([0.01, 0.01, 0.01, 0.01, 0.96]),
                 (4,): np.array([0.01, 0.01, 0.01, 0.01, 0.96]),
                 (4, 4): np.array([0.01, 0.01, 0.01, 0.96, 0.01])}
        tokens = to_numpy(decoding.greedy_search(fixed_distribution_fn(table, 5), 2, 6))
        np.testing.assert_array_equal(tokens, [[4, 4, EOS, PAD, PAD, PAD]] * 2)

    @parameterized.named_parameters(("alpha_0", 0.0), ("alpha_0_6", 0.6), ("alpha_2", 2.0))
    def test_exhaustive_beam_equals_brute_force(self, alpha):
        vocab, length, batch = 4, 4, 2
        # (V - 1)^(L - 1) = 27 alive prefixes at most: a beam of 27 keeps all.
        beam_size = (vocab - 1) ** (length - 1)
        for example in range(batch):
            logits_fn, next_logits = table_logits_fn(vocab, seed=10 + example)
            best, best_score = brute_force_best(next_logits, vocab, length, alpha)
            tokens, scores = decoding.beam_search(logits_fn, 1, length, beam_size, alpha)
            expected = np.full(length, PAD)
            expected[: len(best)] = best
            np.testing.assert_array_equal(to_numpy(tokens)[0], expected)
            np.testing.assert_allclose(to_numpy(scores)[0], best_score, rtol=1e-5)

    def test_beam_finds_what_greedy_misses(self):
        a, b = 4, 1
        # P(a) = 0.5 then P(EOS | a) = 0.3: greedy's a, EOS has P = 0.15.
        # P(b) = 0.4 then P(EOS | b) = 0.9: b, EOS has P = 0.36.
        table = {(): np.array([0.02, 0.4, 0.02, 0.06, 0.5]),
                 (a,): np.array([0.175, 0.175, 0.175, 0.3, 0.175]),
                 (b,): np.array([0.025, 0.025, 0.025, 0.9, 0.025])}
        logits_fn = fixed_distribution_fn(table, 5)
        greedy = to_numpy(decoding.greedy_search(logits_fn, 1, 3))
        np.testing.assert_array_equal(greedy[0], [a, EOS, PAD])
        tokens, scores = decoding.beam_search(logits_fn, 1, 3, beam_size=2, alpha=0.6)
        np.testing.assert_array_equal(to_numpy(tokens)[0], [b, EOS, PAD])
        np.testing.assert_allclose(to_numpy(scores)[0], math.log(0.36) / (7 / 6) ** 0.6, rtol=1e-5)

    def test_bad_arguments_name_the_argument(self):
        logits_fn, _ = table_logits_fn(vocab=4, seed=0)
        with self.assertRaisesRegex(ValueError, r"beam_size.*0"):
            decoding.beam_search(logits_fn, 1, 3, beam_size=0)
        with self.assertRaisesRegex(ValueError, r"alpha.*-1"):
            decoding.beam_search(logits_fn, 1, 3, beam_size=2, alpha=-1.0)
        with self.assertRaisesRegex(ValueError, r"max_length.*0"):
            decoding.greedy_search(logits_fn, 1, 0)


if __name__ == "__main__":
    absltest.main()
