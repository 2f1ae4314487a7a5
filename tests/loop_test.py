"""Tests for trainers/loop.py (in one process, tiny models): evaluation that
equals a recomputation with XLA on and off, the stop on a non-finite loss
(no checkpoint from there on), the checks of the config fields the trainers
share, and the routing statistics of evaluation in the returned logs.

Shape letters: B batch, L length, V vocabulary.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized
from ml_collections import config_dict

import tf_moe
from trainers import checkpoint, loop

V, L = 12, 6


def lm(jit_compile):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((L,), dtype="int32")
    x = keras.layers.Embedding(V, 8)(tokens)
    moe = tf_moe.layers.MoE(4, 8, group_size=L, eval_capacity_factor=None, name="moe")
    logits = keras.layers.Dense(V)(x + moe(x))
    model = keras.Model(tokens, logits)
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[loop.Perplexity()], jit_compile=jit_compile)
    return model


def batches(num_batches, batch=4, seed=0):
    """A tf.data dataset of unknown cardinality (a filter), batched with
    drop_remainder, as the trainers' pipelines are."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (num_batches * batch + 3, L + 1)).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((tokens[:, :-1], tokens[:, 1:]))
    ds = ds.filter(lambda x, y: True).batch(batch, drop_remainder=True)
    assert int(ds.cardinality()) < 0
    return ds, tokens[: num_batches * batch]


def numpy_perplexity(model, tokens):
    logits = np.asarray(model.predict(tokens[:, :-1], verbose=0), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)
    return math.exp(nll.mean())


def train_config(**overrides):
    train = dict(batch_size=4, steps=4, checkpoint_every=2, keep_checkpoints=3,
                 learning_rate=1e-2, warmup_steps=1, log_every=1)
    train.update(overrides)
    return config_dict.ConfigDict({"train": train})


class EvaluateTest(parameterized.TestCase):
    @parameterized.named_parameters(("xla", True), ("no_xla", False))
    def test_equals_a_numpy_recomputation(self, jit_compile):
        model = lm(jit_compile)
        dataset, tokens = batches(5)
        got = loop.evaluate(model, dataset)
        want = numpy_perplexity(model, tokens)
        self.assertAlmostEqual(got["perplexity"], want, delta=1e-4 * want)
        self.assertIn("moe/router_entropy", got)  # evaluation's routing statistics

    def test_keras_without_steps_is_what_loop_evaluate_avoids(self):
        """Keras 3.15 on TF without XLA: evaluate() of an unknown-cardinality
        dataset without `steps` returns another mean (on JAX it is exact). If
        a Keras release stops doing so, this fails: then `loop.evaluate` can
        drop its counting."""
        model = lm(jit_compile=False)
        dataset, tokens = batches(5)
        want = numpy_perplexity(model, tokens)
        plain = model.evaluate(dataset, return_dict=True, verbose=0)["perplexity"]
        if keras.backend.backend() == "tensorflow":
            self.assertGreater(abs(plain - want), 1e-3 * want)
        else:
            self.assertAlmostEqual(plain, want, delta=1e-4 * want)


class FitTest(absltest.TestCase):
    def test_non_finite_loss_stops_with_an_error_and_no_checkpoint(self):
        model = lm(jit_compile=False)
        workdir = self.create_tempdir().full_path
        rng = np.random.default_rng(1)

        def make_train_data(start_step):
            # Steps 0-2 fine; step 3 (the second epoch's second batch) NaN
            # through the inputs of its embedding: a NaN learning signal.
            def gen():
                for step in range(start_step, 100):
                    x = rng.integers(0, V, (4, L)).astype("int32")
                    y = rng.integers(0, V, (4, L)).astype("int32")
                    weight = np.full((4, L), np.nan if step == 3 else 1.0, "float32")
                    yield x, y, weight
            spec = (tf.TensorSpec((4, L), tf.int32), tf.TensorSpec((4, L), tf.int32),
                    tf.TensorSpec((4, L), tf.float32))
            return tf.data.Dataset.from_generator(gen, output_signature=spec)

        config = train_config()
        with self.assertRaisesRegex(loop.NonFiniteLossError, r"training loss is nan at step 4"):
            loop.fit(model, make_train_data, config, workdir, tokens_per_step=4 * L,
                     verbose=0)
        manager = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"))
        self.assertEqual(manager.steps(), [2])  # nothing written at or after the NaN
        _, arrays = manager.read(2)
        self.assertTrue(all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"))

    def test_statistics_reach_the_validation_logs(self):
        model = lm(jit_compile=False)
        dataset, _ = batches(3)
        history = model.fit(dataset, validation_data=dataset, epochs=1, verbose=0,
                            callbacks=[tf_moe.metrics.RoutingStatsLogger()])
        for key in ("moe/router_entropy", "val_moe/router_entropy", "val_moe/max_load"):
            self.assertIn(key, history.history)


class ConfigChecksTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(field="learning_rate", value=float("nan"), message="`train.learning_rate`"),
        dict(field="learning_rate", value=-1.0, message="`train.learning_rate` must be a finite number > 0"),
        dict(field="keep_checkpoints", value=0, message="`train.keep_checkpoints`"),
        dict(field="warmup_steps", value=-1, message="`train.warmup_steps`"),
        dict(field="batch_size", value=0, message="`train.batch_size`"),
        dict(field="log_every", value=0, message="`train.log_every`"),
    )
    def test_train_fields(self, field, value, message):
        with self.assertRaisesRegex(ValueError, message):
            loop.check_train_config(train_config(**{field: value}).train)

    @parameterized.parameters(
        dict(field="sequence_length", value=0, message="`data.sequence_length`"),
        dict(field="eval_batches", value=-1, message="`data.eval_batches`"),
        dict(field="vocab_size", value=0, message="`data.vocab_size`"),
        dict(field="eval_batch_size", value=0, message="`data.eval_batch_size`"),
    )
    def test_data_fields(self, field, value, message):
        data = dict(sequence_length=8, eval_batches=2, vocab_size=100, data_dir=None)
        data[field] = value
        with self.assertRaisesRegex(ValueError, message):
            loop.check_data_config(config_dict.ConfigDict(data))

    def test_dtype_policy(self):
        with self.assertRaisesRegex(
            loop.ConfigError, r"`train.dtype_policy` must be one of .*mixed_bfloat16.*"
            r"Received: train.dtype_policy='bf16'"
        ):
            loop.set_dtype_policy(train_config(dtype_policy="bf16").train)
        self.assertEqual(keras.config.dtype_policy().name, "float32")

    def test_workdir_and_corpus(self):
        with self.assertRaisesRegex(ValueError, "`--workdir` must name a folder.*''"):
            loop.check_workdir("")
        with self.assertRaisesRegex(ValueError, r"`data.corpus` must be a tfds dataset.*'nope'"):
            loop.corpus_builder("nope", None)
        # The error lists every built-in corpus, the large one included.
        with self.assertRaisesRegex(ValueError, r"'tf_moe_lm_en', 'tf_moe_lm_en_large', "
                                                r"'tf_moe_translate_en_de'"):
            loop.corpus_builder("nope", None)

    def test_corpus_not_prepared_in_data_dir(self):
        # A tfds corpus that is registered but not prepared in data.data_dir
        # (tfds itself fails later with an AssertionError naming neither).
        from configs import lstm_moe_tiny
        from trainers import lm_data

        config = lstm_moe_tiny.get_config()
        config.data.corpus, config.data.data_dir = "mnist", self.create_tempdir().full_path
        with self.assertRaisesRegex(
            loop.ConfigError, r"`data.corpus` 'mnist' is not prepared in `data.data_dir`.*"
            r"Received: data.data_dir="
        ):
            lm_data.make(config, config.data.corpus, build_data=True)

    def test_data_source_fields(self):
        from configs import lstm_moe_tiny
        from trainers import lm_data

        config = lstm_moe_tiny.get_config()
        config.data.source = "npy"
        with self.assertRaisesRegex(
            ValueError, r"`data.source` must be one of \('tfds', 'token_cache'\)\. "
            r"Received: data.source='npy'"
        ):
            lm_data.check_source(config.data)
        config.data.source = "token_cache"
        with self.assertRaisesRegex(
            ValueError, r"`data.token_cache_dir` must name a token cache folder.*"
            r"Received: data.token_cache_dir=None"
        ):
            lm_data.check_source(config.data)
        config.data.token_cache_dir = self.create_tempdir().full_path  # no cache in it
        with self.assertRaisesRegex(
            loop.ConfigError, r"`data.token_cache_dir`: No token cache in cache_dir="
        ):
            lm_data.make(config, config.data.corpus, build_data=False)

    def test_transformer_trainer_names_the_built_in_corpora(self):
        # trainers/transformer_moe.py spells them as strings so that it imports
        # no TensorFlow; they must stay the builders' names.
        from tf_moe import data as data_lib
        from trainers import transformer_moe

        self.assertEqual(
            transformer_moe.BUILT_IN_CORPORA,
            {"lm": data_lib.TfMoeLmEn.name, "translate": data_lib.TfMoeTranslateEnDe.name},
        )


class ModelConfigChecksTest(parameterized.TestCase):
    """The model fields of the shipped configs, checked under their
    `model.*` path (the MoE arguments are checked by the layers)."""

    @parameterized.parameters(
        dict(module="lstm_moe_tiny", field="dropout", value=1.5),
        dict(module="lstm_moe_tiny", field="dim", value=0),
        dict(module="lstm_moe_tiny", field="group_size", value=-4),
        dict(module="transformer_moe_tiny_lm", field="dropout", value=1.5),
        dict(module="transformer_moe_tiny_lm", field="num_heads", value=0),
        dict(module="transformer_moe_tiny_lm", field="position", value="rotary2"),
    )
    def test_fields(self, module, field, value):
        import importlib

        from tf_moe.models import lstm_moe, transformer_moe
        config = importlib.import_module(f"configs.{module}").get_config()
        config.model[field] = value
        check = (lstm_moe if module.startswith("lstm") else transformer_moe).check_model_config
        with self.assertRaisesRegex(ValueError, f"`model.{field}`.*{value!r}"):
            check(config.model)


class ParameterSummaryTest(absltest.TestCase):
    def test_counts_experts_and_active_parameters(self):
        model = lm(jit_compile=False)
        summary = tf_moe.metrics.parameter_summary(model)
        (row,) = summary["layers"]
        moe = model.get_layer("moe")
        experts = sum(int(np.prod(v.shape)) for v in moe.experts.trainable_variables)
        router = sum(int(np.prod(v.shape)) for v in moe.router.trainable_variables)
        self.assertEqual((row["name"], row["experts"]), ("moe", 4))
        self.assertEqual(row["total"], experts + router)
        self.assertEqual(row["active"], router + experts // 2)  # k = 2 of 4 experts
        self.assertEqual(summary["total"] - summary["active"], experts // 2)
        lines = []
        tf_moe.metrics.print_parameter_summary(model, print_fn=lines.append)
        self.assertLen(lines, 3)


if __name__ == "__main__":
    absltest.main()
