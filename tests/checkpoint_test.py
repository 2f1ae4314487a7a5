"""Tests for trainers/checkpoint.py: Orbax checkpoints of a compiled model
(variables, optimizer, seed-generator states), and every kind of damage.

Each damage case must either fall back to the previous good checkpoint with
a warning, or fail with an error that says what is wrong; never load
silently. A full disk is simulated (a save that writes part of its folder
and then fails with ENOSPC): this test machine cannot mount a tmpfs.
"""

import errno
import json
import os
import shutil
from unittest import mock

import keras
import numpy as np
from absl.testing import absltest, parameterized

import tf_moe
from trainers import checkpoint as ckpt


def make_model(num_experts=4, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 6))
    moe = tf_moe.layers.MoE(num_experts, 8, router=tf_moe.routing.TopKRouter(k=2, jitter_noise=0.1),
                            group_size=8, expert_dropout=0.1, name="moe")
    model = keras.Model(inputs, keras.layers.Dense(6, name="head")(inputs + moe(inputs)))
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    return model


def train(model, steps=1, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 8, 6)).astype("float32")
    model.fit(x, np.tanh(x), batch_size=8, epochs=steps, verbose=0, shuffle=False)


def state(model):
    return [np.asarray(ops_value) for ops_value in
            (keras.ops.convert_to_numpy(v) for v in ckpt._state_variables(model))]


def data_files(folder):
    """The array data files of a checkpoint's `state` item (OCDBT keeps a
    copy per process and a merged one: damage goes to all)."""
    return [os.path.join(r, n) for r, _, names in os.walk(os.path.join(folder, "state"))
            for n in names if os.path.basename(r) == "d"]


def meta_file(folder):
    return os.path.join(folder, "meta", "metadata")


class CheckpointTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.create_tempdir().full_path
        self.model = make_model()
        train(self.model)
        self.manager = ckpt.CheckpointManager(self.dir, keep=3)
        self.manager.save(10, self.model)
        self.at_10 = state(self.model)
        train(self.model, seed=2)
        self.manager.save(20, self.model)
        self.at_20 = state(self.model)

    def restored(self):
        """(step, state) restored into a fresh model by a fresh manager."""
        model = make_model(seed=5)
        step = ckpt.CheckpointManager(self.dir, keep=3).restore_latest(model)
        return step, state(model)

    def assert_state(self, got, want):
        self.assertLen(got, len(want))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)

    def test_round_trip_holds_everything_an_exact_resume_needs(self):
        step, got = self.restored()
        self.assertEqual(step, 20)
        self.assert_state(got, self.at_20)
        paths = [v.path for v in ckpt._state_variables(self.model)]
        self.assertTrue(any("seed_generator" in p for p in paths), paths)
        self.assertTrue(any(p.startswith("adam") and "momentum" in p for p in paths), paths)
        # Training on from the restored state == training on from the original.
        model = make_model(seed=5)
        ckpt.CheckpointManager(self.dir).restore_latest(model)
        train(model, seed=3)
        train(self.model, seed=3)
        self.assert_state(state(model), state(self.model))

    def test_retention_keeps_the_newest(self):
        for step in (30, 40):
            train(self.model)
            self.manager.save(step, self.model)
        self.assertEqual(self.manager.steps(), [20, 30, 40])
        self.assertCountEqual(os.listdir(self.dir), ["20", "30", "40"])

    def damage_latest(self, how):
        folder = os.path.join(self.dir, "20")
        if how == "flipped":
            for path in data_files(folder):
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    chunk = f.read(16)
                    f.seek(os.path.getsize(path) // 2)
                    f.write(bytes(b ^ 0xFF for b in chunk))
        elif how == "truncated":
            for path in data_files(folder):
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
        elif how == "deleted":
            for path in data_files(folder):
                os.remove(path)
        elif how == "no_state":
            shutil.rmtree(os.path.join(folder, "state"))
        else:
            with open(meta_file(folder)) as f:
                meta = json.load(f)
            if how == "meta_without_variables":
                del meta["variables"]
            elif how == "meta_a_list":
                meta = [meta]
            elif how == "meta_step_a_string":
                meta["step"] = "20"
            elif how == "meta_step_999":
                meta["step"] = 999
            elif how == "meta_not_json":
                meta = None
            with open(meta_file(folder), "w") as f:
                if meta is None:
                    f.write("{not json")
                else:
                    json.dump(meta, f)

    @parameterized.parameters(
        "flipped", "truncated", "deleted", "no_state", "meta_without_variables",
        "meta_a_list", "meta_step_a_string", "meta_step_999", "meta_not_json",
    )
    def test_damage_falls_back_to_previous_with_a_warning(self, how):
        self.damage_latest(how)
        with mock.patch.object(ckpt, "_warn") as warn:
            step, got = self.restored()
        self.assertEqual(step, 10)
        self.assert_state(got, self.at_10)
        self.assertIn("20 is damaged", warn.call_args[0][0])
        # Set aside, so that the resumed run can write step 20 again.
        self.assertTrue(any(n.startswith("20.damaged-") for n in os.listdir(self.dir)))
        manager = ckpt.CheckpointManager(self.dir, keep=3)
        self.assertEqual(manager.steps(), [10])
        manager.save(20, self.model)
        self.assertEqual(manager.steps(), [10, 20])

    def test_no_usable_checkpoint_is_an_error(self):
        for step in ("10", "20"):
            with open(meta_file(os.path.join(self.dir, step)), "w") as f:
                f.write("[]")
        with self.assertRaisesRegex(ckpt.CheckpointError, "None of the 2 checkpoints"):
            ckpt.CheckpointManager(self.dir).restore_latest(make_model())

    def test_a_wrong_shape_in_the_meta_is_damage_not_a_silent_load(self):
        # The meta claims the model's shapes, the arrays have others: the
        # checkpoint of a 2-expert model with its meta edited to 4 experts.
        other = ckpt.CheckpointManager(self.create_tempdir().full_path)
        small = make_model(num_experts=2)
        other.save(20, small)
        shutil.rmtree(os.path.join(self.dir, "20"))
        shutil.copytree(os.path.join(other.directory, "20"), os.path.join(self.dir, "20"))
        with open(meta_file(os.path.join(self.dir, "20"))) as f:
            meta = json.load(f)
        meta["variables"] = ckpt._describe(ckpt._state_variables(self.model))
        meta.pop("sha256")
        with open(meta_file(os.path.join(self.dir, "20")), "w") as f:
            json.dump(meta, f)
        with mock.patch.object(ckpt, "_warn") as warn:
            step, got = self.restored()
        self.assertEqual(step, 10)
        self.assert_state(got, self.at_10)
        self.assertIn("20 is damaged", warn.call_args[0][0])

    def test_another_config_names_the_first_mismatching_variable(self):
        with self.assertRaisesRegex(
            ckpt.CheckpointMismatchError,
            r"Model variable moe/expert_load is \[8\] float32, the checkpoint's "
            r"moe/expert_load is \[4\] float32",
        ):
            ckpt.CheckpointManager(self.dir).restore_latest(make_model(num_experts=8))
        # Nothing was set aside: a mismatch is not damage.
        self.assertCountEqual(os.listdir(self.dir), ["10", "20"])

    def test_killed_saves_and_stray_files_are_cleaned_at_start(self):
        tmp = os.path.join(self.dir, "30.orbax-checkpoint-tmp-1234")
        os.makedirs(os.path.join(tmp, "state"))
        with open(os.path.join(self.dir, "40"), "w") as f:
            f.write("not a checkpoint")
        manager = ckpt.CheckpointManager(self.dir, keep=3)
        self.assertFalse(os.path.exists(tmp))
        self.assertTrue(any(n.startswith("40.not-a-checkpoint-") for n in os.listdir(self.dir)))
        manager.save(40, self.model)  # the file no longer blocks the save
        self.assertEqual(manager.steps(), [10, 20, 40])

    def test_full_disk_leaves_the_previous_checkpoint_usable(self):
        real_save = self.manager._manager.save

        def fill_the_disk(step, *args, **kwargs):
            partial = os.path.join(self.dir, f"{step}.orbax-checkpoint-tmp-99")
            os.makedirs(os.path.join(partial, "state"))
            with open(os.path.join(partial, "state", "chunk"), "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        train(self.model)
        with mock.patch.object(self.manager._manager, "save", side_effect=fill_the_disk):
            with self.assertRaisesRegex(
                ckpt.CheckpointSaveError,
                r"disk is full.*Removed the partial save.*newest good checkpoint is step 20",
            ):
                self.manager.save(30, self.model)
        self.assertCountEqual(os.listdir(self.dir), ["10", "20"])
        step, got = self.restored()
        self.assertEqual(step, 20)
        self.assert_state(got, self.at_20)
        del real_save

    def test_workdir_lock(self):
        workdir = self.create_tempdir().full_path
        lock = ckpt.WorkdirLock(workdir).acquire()
        with self.assertRaisesRegex(ckpt.WorkdirInUseError,
                                    rf"in use by process {os.getpid()} on "):
            ckpt.WorkdirLock(workdir).acquire()
        lock.release()
        self.assertFalse(os.path.exists(os.path.join(workdir, "LOCK")))
        # A lock left by a process that is gone is taken over.
        with open(os.path.join(workdir, "LOCK"), "w") as f:
            json.dump({"host": __import__("socket").gethostname(), "pid": 2 ** 22 + 7,
                       "since": 0}, f)
        with mock.patch.object(ckpt, "_warn") as warn:
            ckpt.WorkdirLock(workdir).acquire().release()
        self.assertIn("taking over", warn.call_args[0][0])

    def test_bad_keep_names_the_field(self):
        with self.assertRaisesRegex(ValueError, r"`train.keep_checkpoints` must be an integer >= 1.*0"):
            ckpt.CheckpointManager(self.create_tempdir().full_path, keep=0)


if __name__ == "__main__":
    absltest.main()
