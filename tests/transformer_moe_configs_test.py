"""The paper-sized Transformer-MoE configs (configs/switch_base.py, gshard.py,
st_moe.py): they hold the numbers their docstrings cite, and each trains for
2 steps end to end (trainers/transformer_moe.py, subprocesses run in
parallel) with tiny size overrides on tests/tiny_corpora.py's corpora:
GShard (a translation model in its paper) as an encoder-decoder on
tiny_translate with BLEU, Switch and ST-MoE as decoder-only LMs on tiny_lm
(the translate path of the trainer is covered by transformer_moe_trainer_test).
On TF the 2-step runs skip XLA (`train.jit_compile=False`), whose compile
time would dominate them.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

import tiny_corpora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ("switch_base", "gshard", "st_moe")

# (dim, ffn hidden, heads, layers per stack, experts, k, second expert policy,
#  normalize weights, z-loss weight, expert activation, MoE every, capacity
#  factor): the papers' values as the config docstrings cite them.
PAPER_NUMBERS = {
    "switch_base": (768, 3072, 12, 12, 128, 1, "all", False, 0.0, "relu", 2, 1.25),
    "gshard": (1024, 8192, 16, 6, 128, 2, "random", True, 0.0, "relu", 2, 1.0),
    "st_moe": (1024, 2816, 16, 24, 32, 2, "all", False, 1e-3, "geglu", 4, 1.25),
}

TASKS = {"switch_base": "lm", "gshard": "translate", "st_moe": "lm"}
# Enough blocks for one MoE block per stack at the config's `moe_every`.
NUM_LAYERS = {"switch_base": 2, "gshard": 2, "st_moe": 4}
CORPORA = {"lm": "tiny_lm", "translate": "tiny_translate"}

TINY_OVERRIDES = [
    "--config.data.vocab_size=400",
    "--config.data.sequence_length=16",
    "--config.data.eval_batches=2",
    "--config.model.dim=16",
    "--config.model.num_heads=2",
    "--config.model.ffn_hidden_dim=32",
    "--config.model.expert_hidden_dim=32",
    "--config.model.num_experts=4",
    "--config.model.group_size=64",
    "--config.train.batch_size=4",
    "--config.train.steps=2",
    "--config.train.checkpoint_every=2",
    "--config.train.warmup_steps=1",
    "--config.eval.bleu_examples=4",
    "--config.eval.decode_batch_size=4",
    "--config.eval.beam_size=2",
]


def smoke_flags(name):
    task = TASKS[name]
    flags = [
        *TINY_OVERRIDES, f"--config.task={task}", f"--config.data.corpus={CORPORA[task]}",
        f"--config.model.num_layers={NUM_LAYERS[name]}",
    ]
    if os.environ.get("KERAS_BACKEND") == "tensorflow":
        flags.append("--config.train.jit_compile=False")
    return flags


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def setUpModule():
    global DATA_DIR
    DATA_DIR = tempfile.mkdtemp()
    tiny_corpora.prepare(DATA_DIR)


class PaperConfigsTest(parameterized.TestCase):
    @parameterized.named_parameters((name, name) for name in PAPER_CONFIGS)
    def test_config_holds_the_paper_numbers(self, name):
        m = load_config(name).model
        actual = (
            m.dim, m.ffn_hidden_dim, m.num_heads, m.num_layers, m.num_experts, m.k,
            m.second_expert_policy, m.normalize_weights, m.z_loss_weight,
            m.expert_activation, m.moe_every, m.capacity_factor,
        )
        self.assertEqual(actual, PAPER_NUMBERS[name])
        self.assertEqual(m.balance_loss_weight, 1e-2)
        self.assertEqual(m.expert_hidden_dim, m.ffn_hidden_dim)
        # Evaluated dropless (the papers used 2.0): see test_evaluation_is_causal.
        self.assertIsNone(m.eval_capacity_factor)
        self.assertEqual(load_config(name).task, "translate")

    @parameterized.named_parameters(
        ("tiny_lm", "transformer_moe_tiny_lm"), ("switch_base", "switch_base"),
        ("st_moe", "st_moe"),
    )
    def test_evaluation_is_causal_and_per_sequence(self, name):
        """With the shipped evaluation settings (at tiny width), the logits at
        positions < t are exactly unchanged when tokens >= t change, and a
        sequence's logits do not depend on its batch-mates."""
        import keras
        import numpy as np

        from tf_moe.models import build_decoder_lm

        m = load_config(name).model
        m.update(dim=16, num_heads=2, ffn_hidden_dim=32, expert_hidden_dim=32,
                  num_experts=4, num_layers=max(2, m.moe_every), group_size=64)
        keras.utils.set_random_seed(0)
        model = build_decoder_lm(50, 16, m)
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, 50, (4, 16)).astype("int32")
        logits = np.asarray(model(tokens, training=False))
        future = tokens.copy()
        future[:, 10:] = rng.integers(1, 50, (4, 6))
        mates = tokens.copy()
        mates[1:] = rng.integers(1, 50, (3, 16))
        changed_future = np.asarray(model(future, training=False))
        changed_mates = np.asarray(model(mates, training=False))
        np.testing.assert_array_equal(changed_future[:, :10], logits[:, :10])
        np.testing.assert_array_equal(changed_mates[0], logits[0])
        self.assertGreater(np.abs(changed_future[:, 10:] - logits[:, 10:]).max(), 0.0)

    def test_two_step_smoke_runs(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        runs = {}
        for name in PAPER_CONFIGS:
            workdir = self.create_tempdir().full_path
            command = [
                sys.executable, "-m", "trainers.transformer_moe",
                f"--config=configs/{name}.py", f"--workdir={workdir}",
                f"--config.data.data_dir={DATA_DIR}", *smoke_flags(name),
            ]
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )
            runs[name] = (process, workdir)
        for name, (process, workdir) in runs.items():
            output, _ = process.communicate(timeout=600)
            with self.subTest(config=name):
                self.assertEqual(process.returncode, 0, msg=output[-3000:])
                with open(os.path.join(workdir, "summary.json")) as f:
                    summary = json.load(f)
                self.assertEqual(summary["steps"], 2)
                self.assertEqual(summary["task"], TASKS[name])
                self.assertTrue(math.isfinite(summary["test_perplexity"]))
                if TASKS[name] == "translate":
                    for key in ("validation_bleu_greedy", "validation_bleu_beam",
                                "test_bleu_greedy", "test_bleu_beam"):
                        self.assertBetween(summary[key], 0.0, 100.0 + 1e-6)
                self.assertGreater(summary["total_parameters"], summary["active_parameters_per_token"])


if __name__ == "__main__":
    absltest.main()
