"""Atomic, verified training checkpoints that resume exactly.

A checkpoint is a folder `ckpt-<step>/` holding `state.npz` (every model
variable, seed-generator states included, and every optimizer variable) and
`meta.json` (step, variable paths and shapes, SHA-256 of state.npz). It is
written under a temporary name and renamed into place, so a killed run never
leaves a half-written `ckpt-*` folder; a damaged one (disk error, manual
edit) fails its checksum and the previous good checkpoint is used.

Written by hand because Keras weight files skip seed-generator state (needed
for a bit-exact resume) and `tf.train.Checkpoint` does not hold JAX-backend
variables. In a multi-process JAX job every process takes part in gathering
the sharded variables, process 0 writes, and every process restores its
shards from the same files (a file system all hosts see); the arrays are
whole on one host, so this suits models that fit one host's memory.
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


def _multi_process_array(variable):
    """The JAX array of `variable` when some of its shards live in other
    processes, else None."""
    value = getattr(variable, "value", None)
    if getattr(value, "is_fully_addressable", True):
        return None
    return value


def _to_numpy(variable):
    """The whole value of `variable` on this host (gathered from every
    process in a multi-process job; all processes must call it)."""
    array = _multi_process_array(variable)
    if array is None:
        return ops.convert_to_numpy(variable)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _assign(variable, value):
    array = _multi_process_array(variable)
    if array is None:
        variable.assign(value)
        return
    import jax

    # This process's shards of the whole `value`, laid out as the variable.
    variable.assign(jax.make_array_from_callback(value.shape, array.sharding,
                                                 lambda index: value[index]))


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

    def save(self, step, model, write=True):
        """Writes checkpoint `step` atomically; prunes old ones. In a
        multi-process job every process calls it (the variables are gathered
        from all) and only the one with `write` writes."""
        variables = _state_variables(model)
        values = [_to_numpy(v) for v in variables]
        if not write:
            return
        final = self.path(step)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        state_path = os.path.join(tmp, "state.npz")
        with open(state_path, "wb") as f:
            np.savez(f, *values)
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
            _assign(variable, value)
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
