"""End-to-end tests of trainers/lstm_moe.py in subprocesses: a tiny run, exact
resume after SIGKILL during a save, a damaged checkpoint, a second trainer
on the same workdir, and bad flags. Data: the
synthetic `tiny_lm` corpus of tests/tiny_corpora.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl.testing import absltest

import tiny_corpora
from trainers.checkpoint import CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 40, 4


def setUpModule():
    global DATA_DIR
    DATA_DIR = tempfile.mkdtemp()
    tiny_corpora.prepare(DATA_DIR)


def _command(workdir, *overrides):
    flags = tiny_corpora.tiny_lstm_flags(300, STEPS, EVERY) + [
        f"--workdir={workdir}",
        f"--config.data.data_dir={DATA_DIR}",
    ]
    return [sys.executable, "-m", "trainers.lstm_moe", *flags, *overrides]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(workdir, *overrides):
    result = subprocess.run(
        _command(workdir, *overrides), cwd=ROOT, env=_env(), capture_output=True,
        text=True, timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


def _final_state(workdir):
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.read(STEPS)[1]


def _largest_data_file(folder):
    """The biggest file of a checkpoint folder (array data)."""
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return max(files, key=os.path.getsize)


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


class LstmMoeTrainerTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The reference run is also the first trainer of the lock test: a
        # second trainer started on its workdir while it runs must refuse.
        cls.reference = tempfile.mkdtemp()
        first = subprocess.Popen(
            _command(cls.reference), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        lock = os.path.join(cls.reference, "LOCK")
        deadline = time.time() + 300
        while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        cls.second_code, cls.second_log = _run(cls.reference)
        cls.reference_log, _ = first.communicate(timeout=600)
        cls.first_pid, cls.lock = first.pid, lock
        assert first.returncode == 0, cls.reference_log[-3000:]

    def assertSameFinalWeights(self, workdir):
        expected, actual = _final_state(self.reference), _final_state(workdir)
        self.assertEqual(len(expected), len(actual))
        for e, a in zip(expected, actual):
            np.testing.assert_array_equal(e, a)

    def test_tiny_run_reports_perplexities(self):
        summary = _summary(self.reference)
        self.assertEqual(summary["steps"], STEPS)
        self.assertEqual(summary["resumed_from_step"], 0)
        for key in ("validation_perplexity", "test_perplexity", "unigram_test_perplexity"):
            self.assertTrue(1.0 < summary[key] < 300.0, f"{key}={summary[key]}")
        # The grammar is learnable: 40 steps beat the unigram model by far
        # (measured on TF: 4.7 vs 30.0 with this seed and learning rate).
        self.assertLess(
            summary["test_perplexity"], 0.5 * summary["unigram_test_perplexity"]
        )
        self.assertLess(summary["active_parameters_per_token"], summary["total_parameters"])
        self.assertIn("tokens_per_sec", self.reference_log)
        self.assertIn("moe/dropped_fraction", self.reference_log)
        tensorboard = os.path.join(self.reference, "tensorboard")
        self.assertTrue(os.listdir(os.path.join(tensorboard, "train")))
        self.assertTrue(os.listdir(os.path.join(tensorboard, "images")))
        # Only the newest `keep_checkpoints` (3) remain.
        self.assertLen(os.listdir(os.path.join(self.reference, "checkpoints")), 3)

    def test_resume_after_sigkill_during_a_save(self):
        """Killed mid-run while Orbax writes a checkpoint (its temporary
        folder exists, an earlier one is complete): the restart removes the
        partial save, resumes from the last complete one and ends with the
        uninterrupted run's weights, bit for bit."""
        workdir = tempfile.mkdtemp()
        checkpoints = os.path.join(workdir, "checkpoints")
        process = subprocess.Popen(
            _command(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline, caught = time.time() + 300, False
        while process.poll() is None and time.time() < deadline:
            names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
            if any(".orbax-checkpoint-tmp" in n for n in names) and len(names) > 1:
                process.send_signal(signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
        process.wait()
        self.assertTrue(caught, "never saw a save in progress")
        self.assertFalse(os.path.exists(os.path.join(workdir, "summary.json")),
                         "the run finished before it could be killed")
        code, log = _run(workdir)
        self.assertEqual(code, 0, log[-3000:])
        self.assertIn("Resuming from step", log)
        self.assertFalse(any(".orbax-checkpoint-tmp" in n for n in os.listdir(checkpoints)))
        summary = _summary(workdir)
        self.assertGreater(summary["resumed_from_step"], 0)
        self.assertLess(summary["resumed_from_step"], STEPS)
        self.assertEqual(summary["resumed_from_step"] % EVERY, 0)
        self.assertEqual(summary["steps"], STEPS)
        self.assertSameFinalWeights(workdir)

    def test_second_trainer_on_the_same_workdir_refuses(self):
        self.assertNotEqual(self.second_code, 0, self.second_log[-3000:])
        self.assertIn(f"WorkdirInUseError: The workdir {self.reference} is in use by "
                      f"process {self.first_pid}", self.second_log)
        self.assertNotIn("Traceback", self.second_log)
        self.assertFalse(os.path.exists(self.lock))  # released at exit

    def test_damaged_latest_checkpoint_falls_back_to_previous(self):
        workdir = tempfile.mkdtemp()
        shutil.copytree(os.path.join(self.reference, "checkpoints"),
                        os.path.join(workdir, "checkpoints"))
        latest = _largest_data_file(os.path.join(workdir, "checkpoints", str(STEPS)))
        with open(latest, "r+b") as f:
            f.seek(os.path.getsize(latest) // 2)
            f.write(b"\x00garbage\x00")
        code, log = _run(workdir)
        self.assertEqual(code, 0, log[-3000:])
        self.assertIn(f"checkpoints/{STEPS} is damaged", log)
        self.assertEqual(_summary(workdir)["resumed_from_step"], STEPS - EVERY)
        self.assertSameFinalWeights(workdir)

    def test_bad_flags_give_clear_errors(self):
        for overrides, message in [
            (["--config.train.checkpoint_every=7"], "`train.steps` must be a multiple"),
            (["--config.train.batch_size=0"], "`train.batch_size` must be an integer >= 1"),
            (["--config.model.k=9"], "`k` must be at most `num_experts`"),
            (["--config.model.nonexistent=1"], "nonexistent"),
        ]:
            code, log = _run(tempfile.mkdtemp(), *overrides)
            self.assertNotEqual(code, 0, overrides)
            self.assertIn(message, log, overrides)


if __name__ == "__main__":
    absltest.main()
