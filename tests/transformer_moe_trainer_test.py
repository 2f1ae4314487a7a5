"""End-to-end tests of trainers/transformer_moe.py in subprocesses, on the
synthetic corpora of tests/tiny_corpora.py: a translation run that must learn
(the German of tiny_translate is a word-by-word function of the English), a
language-model run, and bad configs.

The learning check, measured on a 2-core CPU with these exact settings
(160 steps of batch 32): validation perplexity 1.04 (TF) / 1.04 (JAX), greedy
test BLEU 98.7 / 98.4, beam 100 / 100. After 100 steps it was still at
perplexity 1.3 and greedy BLEU 38-50, and an untrained model sits near the
vocabulary size (342) and BLEU 0, so the asserted bounds (perplexity < 1.5,
BLEU > 60) leave a margin and still fail for a model that does not learn.
"""

import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

import tiny_corpora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough for seconds per run on CPU.
TINY_MODEL = [
    "--config.data.vocab_size=400",
    "--config.data.sequence_length=32",
    "--config.model.dim=64",
    "--config.model.num_heads=2",
    "--config.model.ffn_hidden_dim=128",
    "--config.model.expert_hidden_dim=128",
    "--config.model.num_experts=4",
    "--config.model.dropout=0.0",
    "--config.model.expert_dropout=0.0",
    "--config.model.group_size=256",
]


def setUpModule():
    global DATA_DIR
    DATA_DIR = tempfile.mkdtemp()
    tiny_corpora.prepare(DATA_DIR)


def run_trainer(config, workdir, *overrides):
    """Runs the trainer; returns (returncode, combined output)."""
    command = [
        sys.executable, "-m", "trainers.transformer_moe", f"--config={config}",
        f"--workdir={workdir}", f"--config.data.data_dir={DATA_DIR}", *overrides,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    return result.returncode, result.stdout + result.stderr


def keras_backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def read_summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


class TransformerMoeTrainerTest(absltest.TestCase):
    def run_ok(self, config, *overrides):
        workdir = self.create_tempdir().full_path
        code, output = run_trainer(config, workdir, *overrides)
        self.assertEqual(code, 0, msg=output[-3000:])
        return read_summary(workdir)

    def assert_common_summary(self, summary, steps):
        self.assertEqual(summary["steps"], steps)
        self.assertEqual(summary["resumed_from_step"], 0)
        for split in ("validation", "test"):
            value = summary[f"{split}_perplexity"]
            self.assertTrue(math.isfinite(value) and value >= 1.0, msg=f"{split}: {value}")
        # Experts a token does not use make active < total.
        self.assertGreater(summary["total_parameters"], summary["active_parameters_per_token"])
        self.assertGreater(summary["active_parameters_per_token"], 0)
        self.assertGreater(summary["train_tokens_per_sec"], 0)

    def test_translation_learns(self):
        steps = 160
        summary = self.run_ok(
            "configs/transformer_moe_tiny_translate.py",
            "--config.data.corpus=tiny_translate",
            *TINY_MODEL,
            f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=80",
            "--config.train.warmup_steps=20",
            "--config.train.learning_rate=3e-3",
            "--config.data.eval_batches=0",
            "--config.eval.beam_size=3",
            "--config.eval.bleu_examples=40",
            "--config.eval.decode_batch_size=40",
        )
        self.assert_common_summary(summary, steps)
        self.assertEqual(summary["task"], "translate")
        self.assertEqual(summary["beam_size"], 3)
        for split in ("validation", "test"):
            for search in ("greedy", "beam"):
                bleu = summary[f"{split}_bleu_{search}"]
                self.assertBetween(bleu, 0.0, 100.0 + 1e-6)  # sacrebleu rounding
                # Learning check (see the module docstring for the measured values).
                self.assertGreater(bleu, 60.0, msg=f"{split} {search}")
            self.assertLess(summary[f"{split}_perplexity"], 1.5)

    def test_language_model_run(self):
        steps = 20
        summary = self.run_ok(
            "configs/transformer_moe_tiny_lm.py",
            "--config.data.corpus=tiny_lm",
            *TINY_MODEL,
            "--config.model.num_layers=2",
            "--config.train.batch_size=8",
            f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=10",
            "--config.train.warmup_steps=5",
            "--config.data.eval_batches=4",
        )
        self.assert_common_summary(summary, steps)
        self.assertEqual(summary["task"], "lm")
        self.assertNotIn("test_bleu_greedy", summary)
        # 20 steps of a grammar with a few dozen words: far below uniform (342).
        self.assertLess(summary["test_perplexity"], 100.0)

    def test_scaling_out_flags(self):
        """JAX: --mesh (expert-parallel on 8 CPU devices) gives the one-device
        run's numbers; TF: --strategy=mirrored over 2 logical CPUs trains
        with 2 replicas (exactness: mirrored_test.py)."""
        common = [
            "configs/transformer_moe_tiny_lm.py", "--config.data.corpus=tiny_lm", *TINY_MODEL,
            "--config.model.num_experts=8", "--config.model.group_size=32",
            "--config.model.second_expert_policy=all", "--config.train.batch_size=16",
            "--config.train.steps=4", "--config.train.checkpoint_every=2",
            "--config.train.warmup_steps=1", "--config.data.eval_batches=2",
        ]
        if keras_backend() == "jax":
            plain = self.run_ok(*common)
            mesh = self.run_ok(*common, "--cpu_devices=8", "--mesh=batch:2,expert:4")
            self.assertEqual(mesh["mesh"], {"batch": 2, "expert": 4, "model": 1})
            self.assertEqual(mesh["devices"], 8)
            for key in ("validation_perplexity", "test_perplexity"):
                self.assertAlmostEqual(mesh[key], plain[key], delta=1e-3 * plain[key])
            wrong, message = "--strategy=mirrored", r"`--strategy` is for the TensorFlow backend"
        else:
            mirrored = self.run_ok(*common, "--cpu_devices=2", "--strategy=mirrored")
            self.assertEqual((mirrored["strategy"], mirrored["replicas"]), ("MirroredStrategy", 2))
            self.assert_common_summary(mirrored, 4)
            wrong, message = "--mesh=expert:2", r"`--mesh` is for the JAX backend"
        batch = 12 if keras_backend() == "jax" else 9  # not divisible by 8 / 2 shards
        bad = {
            wrong: message,
            f"--config.train.batch_size={batch}": r"train\.batch_size.*divisible by the (8|2) data shards",
        }
        distributed = (["--cpu_devices=8", "--mesh=batch:2,expert:4"] if keras_backend() == "jax"
                       else ["--cpu_devices=2", "--strategy=mirrored"])
        for flag, pattern in bad.items():
            with self.subTest(flag=flag):
                workdir = self.create_tempdir().full_path
                extra = distributed if "batch_size" in flag else []
                code, output = run_trainer(common[0], workdir, *common[1:], *extra, flag)
                self.assertNotEqual(code, 0)
                self.assertRegex(output, "ValueError: .*" + pattern)

    def test_bad_configs_name_the_field(self):
        cases = {
            "--config.task=foo": r"config\.task.*'foo'",
            "--config.eval.beam_size=0": r"eval\.beam_size.*0",
        }
        for flag, pattern in cases.items():
            with self.subTest(flag=flag):
                workdir = self.create_tempdir().full_path
                code, output = run_trainer(
                    "configs/transformer_moe_tiny_translate.py", workdir,
                    "--config.data.corpus=tiny_translate", flag,
                )
                self.assertNotEqual(code, 0)
                self.assertRegex(output, "ValueError: .*" + pattern)
                self.assertFalse(os.path.exists(os.path.join(workdir, "summary.json")))


if __name__ == "__main__":
    absltest.main()
