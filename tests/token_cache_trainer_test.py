"""The trainers on `data.source=token_cache`: without TensorFlow, exact resume,
the same data as the tf.data path, and config errors.

The tiny `tiny_lm` corpus (tests/tiny_corpora.py) is exported once to a
token cache. The trainer runs happen in subprocesses where TensorFlow,
tensorflow_datasets and tensorflow_text cannot be imported (as on a JAX GPU
host); the in-process checks compare `trainers.lm_data` with the `tf.data`
pipeline, an independent reader of the same corpus.
"""

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
from absl.testing import absltest

import tiny_corpora
from configs import lstm_moe_tiny
from tf_moe.data import pipeline
from tf_moe.data import token_cache
from tf_moe.data import tokenizer as tokenizer_lib
from tf_moe.models import build_lstm_moe
from trainers import lm_data, loop
from trainers.checkpoint import CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 300
STEPS, EVERY = 40, 4

# Runs a trainer module (argv[1]) with the rest of argv as its flags, as if
# TensorFlow were not installed: the path finder does not find it
# (`importlib.util.find_spec` gives None, `import` raises ModuleNotFoundError).
_WITHOUT_TENSORFLOW = """
import importlib.machinery, runpy, sys

BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorflow_text")

class WithoutTensorFlow:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path = [
    WithoutTensorFlow(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

LSTM_FLAGS = tiny_corpora.tiny_lstm_flags(VOCAB_SIZE, STEPS, EVERY) + [
    "--config.data.source=token_cache",
]


def setUpModule():
    global DATA_DIR, CACHE_DIR
    DATA_DIR = tempfile.mkdtemp(prefix="token_cache_trainer_test_")
    tiny_corpora.TinyLm(data_dir=DATA_DIR).download_and_prepare()
    tokenizer = tokenizer_lib.load_or_train(tiny_corpora.TinyLm.name, DATA_DIR, VOCAB_SIZE)
    CACHE_DIR = os.path.join(DATA_DIR, "cache")
    token_cache.export_lm_cache(tiny_corpora.TinyLm.name, DATA_DIR, CACHE_DIR, tokenizer)


def tearDownModule():
    shutil.rmtree(DATA_DIR, ignore_errors=True)


def run_without_tensorflow(module, workdir, *flags):
    """(returncode, output) of `python -m module` with TensorFlow blocked."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, module, f"--workdir={workdir}", *flags,
         f"--config.data.token_cache_dir={CACHE_DIR}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


def read_summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def tiny_config():
    """The LSTM config of LSTM_FLAGS, in-process."""
    config = lstm_moe_tiny.get_config()
    config.data.update(
        corpus="tiny_lm", data_dir=DATA_DIR, source="token_cache",
        token_cache_dir=CACHE_DIR, vocab_size=VOCAB_SIZE, sequence_length=16,
        eval_batches=4,
    )
    config.train.batch_size = 8
    return config


class LstmTrainerWithoutTensorFlowTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.reference = tempfile.mkdtemp()
        code, cls.reference_log = run_without_tensorflow(
            "trainers.lstm_moe", cls.reference, *LSTM_FLAGS
        )
        assert code == 0, cls.reference_log[-3000:]

    def test_trains_and_reports(self):
        summary = read_summary(self.reference)
        self.assertEqual(summary["backend"], "jax")
        self.assertEqual(summary["data_source"], "token_cache")
        self.assertEqual(summary["steps"], STEPS)
        # The grammar is learnable: 40 steps beat the unigram model by far.
        self.assertLess(summary["test_perplexity"], 0.5 * summary["unigram_test_perplexity"])
        self.assertIn("TensorFlow is not installed", self.reference_log)
        self.assertFalse(os.path.exists(os.path.join(self.reference, "tensorboard")))
        with open(os.path.join(self.reference, loop.METRICS_CSV)) as f:
            rows = list(csv.DictReader(f))
        self.assertLen(rows, STEPS // EVERY)  # one row per checkpoint-sized epoch
        self.assertIn("moe/dropped_fraction", rows[0])
        losses = [float(row["loss"]) for row in rows]
        self.assertLess(losses[-1], losses[0])

    def test_resume_matches_uninterrupted_run(self):
        # The run interrupted after step 32: its newer checkpoints and
        # summary are gone. Resuming must read batches 32.. of the stream.
        workdir = os.path.join(tempfile.mkdtemp(), "run")
        shutil.copytree(self.reference, workdir)
        checkpoints = os.path.join(workdir, "checkpoints")
        for step in (STEPS - EVERY, STEPS):
            shutil.rmtree(os.path.join(checkpoints, str(step)))
        os.remove(os.path.join(workdir, "summary.json"))
        code, log = run_without_tensorflow("trainers.lstm_moe", workdir, *LSTM_FLAGS)
        self.assertEqual(code, 0, log[-3000:])
        self.assertIn(f"Resuming from step {STEPS - 2 * EVERY}", log)
        self.assertEqual(read_summary(workdir)["resumed_from_step"], STEPS - 2 * EVERY)
        expected = CheckpointManager(os.path.join(self.reference, "checkpoints")).read(STEPS)[1]
        actual = CheckpointManager(checkpoints).read(STEPS)[1]
        self.assertEqual(len(expected), len(actual))
        for e, a in zip(expected, actual):
            np.testing.assert_array_equal(e, a)

    def test_config_errors_name_the_field(self):
        workdir = tempfile.mkdtemp()
        code, log = run_without_tensorflow(
            "trainers.lstm_moe", workdir, *LSTM_FLAGS, "--config.data.vocab_size=512"
        )
        self.assertEqual(code, 1, log[-3000:])
        self.assertIn("`data.vocab_size` is 512", log)
        self.assertIn(f"set data.vocab_size={VOCAB_SIZE}", log)
        self.assertNotIn("Traceback", log)


class TransformerLmWithoutTensorFlowTest(absltest.TestCase):
    def test_trains_lm_on_token_cache(self):
        workdir = tempfile.mkdtemp()
        code, log = run_without_tensorflow(
            "trainers.transformer_moe", workdir,
            "--config=configs/transformer_moe_tiny_lm.py",
            "--config.data.corpus=tiny_lm",
            "--config.data.source=token_cache",
            f"--config.data.vocab_size={VOCAB_SIZE}",
            "--config.data.sequence_length=16",
            "--config.data.eval_batches=2",
            "--config.model.dim=32", "--config.model.num_heads=2",
            "--config.model.ffn_hidden_dim=64", "--config.model.expert_hidden_dim=64",
            "--config.model.num_experts=4", "--config.model.group_size=64",
            "--config.train.batch_size=8", "--config.train.steps=8",
            "--config.train.checkpoint_every=4", "--config.train.warmup_steps=2",
        )
        self.assertEqual(code, 0, log[-3000:])
        summary = read_summary(workdir)
        self.assertEqual((summary["task"], summary["data_source"]), ("lm", "token_cache"))
        self.assertEqual(summary["steps"], 8)
        # Better than uniform over the vocabulary after 8 steps.
        self.assertLess(summary["test_perplexity"], VOCAB_SIZE)

    def test_translation_refuses_token_cache(self):
        code, log = run_without_tensorflow(
            "trainers.transformer_moe", tempfile.mkdtemp(),
            "--config=configs/transformer_moe_tiny_translate.py",
            "--config.data.source=token_cache",
        )
        self.assertEqual(code, 1, log[-3000:])
        self.assertIn("`data.source` must be 'tfds' for config.task='translate'", log)


class LmDataTest(absltest.TestCase):
    """`lm_data` on the token cache against the tf.data pipeline."""

    def test_evaluation_batches_equal_tf_data(self):
        data = lm_data.make(tiny_config(), "tiny_lm", build_data=False)
        tokenizer = tokenizer_lib.load_or_train("tiny_lm", DATA_DIR, VOCAB_SIZE)
        for split, batches in (("validation", data.validation), ("test", data.test)):
            expected = list(
                pipeline.lm_dataset("tiny_lm", split, 16, 8, DATA_DIR, tokenizer=tokenizer,
                                    shuffle=False).take(4).as_numpy_iterator()
            )
            self.assertLen(batches, len(expected))
            for (x, y), (ex, ey) in zip(batches, expected):
                np.testing.assert_array_equal(x, ex)
                np.testing.assert_array_equal(y, ey)

    def test_eval_batch_size_rebatches_the_same_windows_and_perplexity(self):
        """`data.eval_batch_size` changes how evaluation batches, not what it
        scores: the same windows in the same order, and (evaluation routes
        dropless) the same perplexity of an MoE model."""
        config = tiny_config()  # train.batch_size 8, 4 evaluation batches
        config.data.eval_batches = 0
        whole = lm_data.make(config, "tiny_lm", build_data=False)
        config.data.eval_batch_size = 2
        small = lm_data.make(config, "tiny_lm", build_data=False)
        for split in ("validation", "test"):
            big, few = getattr(whole, split), getattr(small, split)
            self.assertEqual({len(x) for x, _ in few}, {2})
            n = 8 * len(big)  # the small batches also hold the big ones' dropped tail
            for i in (0, 1):
                np.testing.assert_array_equal(
                    np.concatenate([b[i] for b in few])[:n], np.concatenate([b[i] for b in big])
                )
        m = config.model
        m.update(dim=16, expert_hidden_dim=16, num_experts=4, k=2, group_size=64)
        model = build_lstm_moe(VOCAB_SIZE, config.data.sequence_length, m)
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[loop.Perplexity()])
        test_big = whole.test
        test_small = small.test[: 4 * len(test_big)]  # the same windows
        np.testing.assert_allclose(  # float32 sums in another order
            loop.evaluate(model, test_small)["perplexity"],
            loop.evaluate(model, test_big)["perplexity"], rtol=1e-5,
        )
        config.data.eval_batch_size = 10_000
        with self.assertRaisesRegex(
            loop.ConfigError, r"`data.eval_batch_size` are too long.*split 'validation'.*"
            r"Received: data.sequence_length=16, data.eval_batch_size=10000"
        ):
            lm_data.make(config, "tiny_lm", build_data=False)

    def test_tfds_corpus_of_the_wrong_kind(self):
        tiny_corpora.TinyTranslate(data_dir=DATA_DIR).download_and_prepare()
        config = tiny_config()
        config.data.source = "tfds"
        with self.assertRaisesRegex(
            loop.ConfigError, r"`data.corpus` is a translation dataset; this task needs a "
            r"text \(language-modelling\) dataset. Received: data.corpus='tiny_translate'"
        ):
            lm_data.make(config, "tiny_translate", build_data=False)
        with self.assertRaisesRegex(
            loop.ConfigError, r"`data.corpus` is a text \(language-modelling\) dataset; this "
            r"task needs a translation dataset. Received: data.corpus='tiny_lm'"
        ):
            lm_data.prepare_tfds_corpus(config.data, "tiny_lm", False, translation=True)

    def test_train_counts_equal_tf_data(self):
        data = lm_data.make(tiny_config(), "tiny_lm", build_data=False)
        tokenizer = tokenizer_lib.load_or_train("tiny_lm", DATA_DIR, VOCAB_SIZE)
        targets = [
            t for _, t in pipeline.lm_dataset(
                "tiny_lm", "train", 16, 1, DATA_DIR, tokenizer=tokenizer, shuffle=False
            ).as_numpy_iterator()
        ]
        expected = np.bincount(np.concatenate(targets).ravel(), minlength=VOCAB_SIZE)
        np.testing.assert_array_equal(data.train_target_counts(), expected)

    def test_train_stream_starts_at_the_step(self):
        data = lm_data.make(tiny_config(), "tiny_lm", build_data=False)
        # Past the first epoch (the tiny train split has a few dozen batches).
        whole = list(itertools.islice(data.make_train(0), 200))
        resumed = list(itertools.islice(data.make_train(150), 50))
        for (x, y), (ex, ey) in zip(resumed, whole[150:]):
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)
        # And the stream is shuffled: not the split's order.
        cache = token_cache.load_lm_cache(CACHE_DIR)
        in_order = next(token_cache.lm_loader(cache, "train", 16, 8, shuffle=False))
        self.assertFalse(np.array_equal(whole[0][0], in_order[0]))

    def test_cache_of_another_corpus_or_vocabulary(self):
        config = tiny_config()
        with self.assertRaisesRegex(
            loop.ConfigError, r"exported from corpus 'tiny_lm', but `data.corpus` is "
            r"'tf_moe_lm_en'"
        ):
            lm_data.make(config, "tf_moe_lm_en", build_data=False)
        config.data.sequence_length = 10_000
        with self.assertRaisesRegex(
            loop.ConfigError, r"`data.sequence_length` .* too long.*split '\w+' .*"
            r"Received: data.sequence_length=10000, train.batch_size=8"
        ):
            lm_data.make(config, "tiny_lm", build_data=False)


if __name__ == "__main__":
    absltest.main()
