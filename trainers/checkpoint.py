"""Atomic, verified training checkpoints that resume exactly.

A checkpoint is a folder `ckpt-<step>/` holding `state.npz` (every model
variable, seed-generator states included, and every optimizer variable) and
`meta.json` (step, variable paths and shapes, SHA-256 of state.npz). It is
written under a temporary name and renamed into place, so a killed run never
leaves a half-written `ckpt-*` folder; a damaged one (disk error, manual
edit) fails its checksum and the previous good checkpoint is used.

Written by hand because Keras weight files skip seed-generator state (needed
for a bit-exact resume) and `tf.train.Checkpoint` does not hold JAX-backend
variables.
"""

import hashlib
import json
import os
import shutil

import numpy as np
from absl import logging
from keras import ops

_PREFIX = "ckpt-"


class CheckpointError(Exception):
    """A checkpoint exists but cannot be used."""


def _digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _state_variables(model):
    """Model variables then optimizer variables, in a stable order."""
    return list(model.variables) + list(model.optimizer.variables)


class CheckpointManager:
    """Saves and restores `model` (compiled, with its optimizer) under `directory`.

    Args:
        directory: folder for `ckpt-<step>` folders (created if missing).
        keep: int >= 1, how many newest checkpoints to keep.
    """

    def __init__(self, directory, keep=3):
        if keep < 1:
            raise ValueError(f"`keep` must be >= 1. Received: keep={keep}")
        self.directory = directory
        self.keep = keep
        os.makedirs(directory, exist_ok=True)

    def steps(self):
        """Steps of the complete checkpoints present, oldest first."""
        steps = []
        for name in os.listdir(self.directory):
            if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit():
                steps.append(int(name[len(_PREFIX):]))
        return sorted(steps)

    def path(self, step):
        return os.path.join(self.directory, f"{_PREFIX}{step:09d}")

    def save(self, step, model):
        """Writes checkpoint `step` atomically; prunes old ones."""
        variables = _state_variables(model)
        final = self.path(step)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        state_path = os.path.join(tmp, "state.npz")
        with open(state_path, "wb") as f:
            np.savez(f, *[ops.convert_to_numpy(v) for v in variables])
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "step": int(step),
            "variables": [[v.path, list(v.shape)] for v in variables],
            "sha256": _digest(state_path),
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)

    def _load(self, step, model):
        folder = self.path(step)
        try:
            with open(os.path.join(folder, "meta.json")) as f:
                meta = json.load(f)
            state_path = os.path.join(folder, "state.npz")
            if _digest(state_path) != meta["sha256"]:
                raise CheckpointError("state.npz does not match its SHA-256 in meta.json")
            with np.load(state_path) as npz:
                values = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError) as e:  # missing / unreadable files
            raise CheckpointError(f"{type(e).__name__}: {e}") from e
        variables = _state_variables(model)
        # Shapes only: auto-generated variable names differ between processes.
        saved = [shape for _, shape in meta["variables"]]
        expected = [list(v.shape) for v in variables]
        if saved != expected:
            raise CheckpointError(
                "its variable shapes do not match the model's (was the config "
                f"changed?); checkpoint has {len(saved)} variables, model "
                f"{len(expected)}"
            )
        for variable, value in zip(variables, values):
            variable.assign(value)
        return meta["step"]

    def restore_latest(self, model):
        """Restores the newest good checkpoint into `model`.

        The optimizer must be built (`model.optimizer.build(
        model.trainable_variables)`). Damaged checkpoints are reported and
        skipped.

        Returns:
            The restored step, or 0 when there is no usable checkpoint.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._load(step, model)
            except CheckpointError as e:
                logging.warning(
                    "Checkpoint %s is damaged and was skipped: %s. Falling back "
                    "to an older checkpoint.", self.path(step), e,
                )
                print(f"WARNING: checkpoint {self.path(step)} is damaged ({e}); "
                      "using the previous good one.", flush=True)
                continue
            logging.info("Restored %s", self.path(step))
            return restored
        return 0
