"""Training checkpoints on Orbax: exact resume, any mesh, damage detected.

A checkpoint is an Orbax step folder `<directory>/<step>/` with two items:
- `state`: every model variable (seed-generator states included) and every
  optimizer variable, as arrays keyed `v00000`, `v00001`, ... in a stable
  order. On JAX a sharded `jax.Array` is written by each process for its own
  shards (no gather to one host); on TensorFlow the values are NumPy arrays.
- `meta`: JSON with the format, the step, every variable's path, shape and
  dtype, and (single-process saves) a SHA-256 of every array's bytes.

Orbax writes a step under a temporary name and renames it when complete
(`commit_success.txt`); temporary folders of killed saves are removed when
the manager starts, and only the newest `keep` checkpoints are kept.
Restoring reads onto the model's variables as they are laid out now, so a
checkpoint of one mesh restores onto another mesh or one device (Orbax
reshards). What the data iterator needs is the step: the trainers' input
pipelines are positioned by it.

Damage never loads silently: a meta file that is not what this module
writes, a step that disagrees with its folder, a missing or mis-shaped
array, or an array whose bytes fail their SHA-256 makes that checkpoint
unusable; it is set aside as `<step>.damaged-<time>` and the newest usable
one is restored, with a warning naming what was wrong (with none usable,
`CheckpointError` says so). A checkpoint that describes another model (a changed config) is not
damage: `CheckpointMismatchError` names the first variable that differs. A
failed save (e.g. a full disk) removes what it wrote, leaves the previous
checkpoints as they were, and raises `CheckpointSaveError`.

`WorkdirLock` keeps a second trainer out of a workdir in use.

The npz format of earlier versions is not read: those runs start over.
"""

import errno
import hashlib
import json
import os
import shutil
import socket
import time

import numpy as np
from absl import logging
from keras import ops

FORMAT = "tf_moe-orbax-1"


class CheckpointError(Exception):
    """A checkpoint exists but cannot be used (damaged)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds the variables of another model."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the earlier ones are intact."""


class WorkdirInUseError(RuntimeError):
    """Another trainer holds the workdir."""


def _state_variables(model):
    """Model variables then optimizer variables, in a stable order."""
    return list(model.variables) + list(model.optimizer.variables)


def _key(index):
    return f"v{index:05d}"


def _is_multi_process_array(value):
    return not getattr(value, "is_fully_addressable", True)


def _value(variable):
    """What is saved for `variable`: its jax.Array on JAX (written shard by
    shard), a NumPy array on TensorFlow (a tf.distribute variable's value)."""
    value = variable.value
    if type(value).__module__.startswith("jax"):
        return value
    return ops.convert_to_numpy(variable)


def _digest(array):
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(array.view(np.uint8).reshape(-1)).hexdigest()


def _target(variable):
    """What Orbax restores `variable` as: an array of the variable's shape,
    dtype and (JAX) present sharding."""
    value = variable.value
    if type(value).__module__.startswith("jax"):
        import jax

        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
    return np.zeros(tuple(variable.shape), dtype=_dtype_name(variable))


def _dtype_name(variable):
    return str(np.dtype(ops.convert_to_numpy(ops.zeros((), variable.dtype)).dtype))


def _describe(variables):
    return [[v.path, list(v.shape), _dtype_name(v)] for v in variables]


def _check_meta(meta, step):
    """Raises CheckpointError unless `meta` is a meta item this module wrote
    for `step`."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"meta is not a {FORMAT} record")
    if type(meta.get("step")) is not int or meta["step"] != step:
        raise CheckpointError(
            f"meta says step {meta.get('step')!r} in the folder of step {step}"
        )
    variables = meta.get("variables")
    if not isinstance(variables, list) or not all(
        isinstance(v, list) and len(v) == 3 and isinstance(v[0], str)
        and isinstance(v[1], list) and isinstance(v[2], str) for v in variables
    ):
        raise CheckpointError("meta's variable list is malformed")
    digests = meta.get("sha256")
    if digests is not None and (
        not isinstance(digests, list) or len(digests) != len(variables)
    ):
        raise CheckpointError("meta's SHA-256 list does not match its variables")


def check_compatible(saved, model_variables):
    """Raises CheckpointMismatchError naming the first model variable whose
    shape or dtype differs from the checkpoint's (or that it lacks).
    Paths are not compared: auto-generated layer names can differ between
    processes that build the same model."""
    expected = _describe(model_variables)
    for index in range(max(len(saved), len(expected))):
        if index >= len(saved):
            path, shape, dtype = expected[index]
            raise CheckpointMismatchError(
                f"The checkpoint holds {len(saved)} variables, the model "
                f"{len(expected)}: it has nothing for {path} {shape} {dtype} (was "
                "the config changed?)."
            )
        if index >= len(expected):
            raise CheckpointMismatchError(
                f"The checkpoint holds {len(saved)} variables, the model "
                f"{len(expected)}: the model has nothing for the checkpoint's "
                f"{saved[index][0]} {saved[index][1]} (was the config changed?)."
            )
        if saved[index][1:] != expected[index][1:]:
            path, shape, dtype = expected[index]
            raise CheckpointMismatchError(
                f"Model variable {path} is {shape} {dtype}, the checkpoint's "
                f"{saved[index][0]} is {saved[index][1]} {saved[index][2]} "
                "(was the config changed?)."
            )


class CheckpointManager:
    """Saves and restores `model` (compiled, optimizer built) under `directory`.

    Args:
        directory: folder of the step folders (created if missing).
        keep: int >= 1, how many newest checkpoints to keep.
        async_save: save in the background (Orbax); the next save, `wait`
            and `restore_latest` wait for it.
    """

    def __init__(self, directory, keep=3, async_save=False):
        import orbax.checkpoint as ocp

        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(
                f"`train.keep_checkpoints` must be an integer >= 1. Received: {keep!r}"
            )
        self.directory = os.path.abspath(directory)
        self.keep = keep
        os.makedirs(self.directory, exist_ok=True)
        self._set_aside_strays()
        self._remove_partial_saves()
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "meta"),
        )

    def _set_aside_strays(self):
        """A file (not a folder) named like a step would break every save:
        rename it out of the way, with a warning (never delete it)."""
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.isdigit() and not os.path.isdir(path):
                aside = f"{path}.not-a-checkpoint-{int(time.time())}"
                os.replace(path, aside)
                _warn(f"{path} is a file, not a checkpoint folder; moved it to {aside}.")

    def _remove_partial_saves(self):
        """Temporary folders of saves that never finished (a killed run)."""
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                logging.info("Removed the unfinished save %s", name)

    def steps(self):
        """Steps of the complete checkpoints, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def path(self, step):
        return os.path.join(self.directory, str(step))

    def wait(self):
        """Waits for a background save; raises CheckpointSaveError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - Orbax surfaces any I/O error
            raise self._save_failed(None, error) from error

    def save(self, step, model, write=True):
        """Writes checkpoint `step` (every process of a multi-process job calls
        it; Orbax has each write its shards). `write=False` skips the
        checksums' gather only; Orbax decides who writes what.

        Raises:
            CheckpointSaveError: the save failed (e.g. no space left); what it
                wrote is removed, the earlier checkpoints are intact.
        """
        del write  # Orbax coordinates the processes itself.
        ocp = self._ocp
        self.wait()
        if int(step) in self._manager.all_steps():
            return  # written already (a resumed run at a checkpoint step)
        variables = _state_variables(model)
        tree = {_key(i): _value(v) for i, v in enumerate(variables)}
        meta = {"format": FORMAT, "step": int(step), "variables": _describe(variables)}
        if not any(_is_multi_process_array(value) for value in tree.values()):
            meta["sha256"] = [_digest(value) for value in tree.values()]
        try:
            self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as error:  # noqa: BLE001 - any I/O error of the save
            raise self._save_failed(step, error) from error

    def _save_failed(self, step, error):
        """Removes the partial folders of a failed save; the error to raise."""
        removed = []
        for name in os.listdir(self.directory):
            partial = ".orbax-checkpoint-tmp" in name or (
                step is not None and name == str(step)
                and not os.path.exists(os.path.join(self.directory, name, "commit_success.txt"))
            )
            if partial:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                removed.append(name)
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC or (
            "No space left" in str(error)
        )
        good = [s for s in self._manager.all_steps() if s != step]
        return CheckpointSaveError(
            f"Saving checkpoint {step if step is not None else '(background)'} in "
            f"{self.directory} failed: {type(error).__name__}: {error}. "
            + ("The disk is full: free space, then run again to resume. " if full else "")
            + (f"Removed the partial save ({', '.join(removed)}). " if removed else "")
            + (f"The newest good checkpoint is step {max(good)}."
               if good else "There is no earlier checkpoint.")
        )

    def _load(self, step, model):
        ocp = self._ocp
        variables = _state_variables(model)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as error:  # noqa: BLE001 - unreadable meta
            raise CheckpointError(f"its meta item does not load: {error}") from error
        _check_meta(meta, step)
        check_compatible(meta["variables"], variables)
        targets = {_key(i): _target(v) for i, v in enumerate(variables)}
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(targets))
            )["state"]
        except Exception as error:  # noqa: BLE001 - missing or unreadable arrays
            raise CheckpointError(f"its arrays do not load: {type(error).__name__}: {error}") from error
        if set(state) != set(targets):
            raise CheckpointError("its arrays are not the model's")
        digests = meta.get("sha256")
        for index, variable in enumerate(variables):
            value = state[_key(index)]
            if tuple(value.shape) != tuple(variable.shape):
                raise CheckpointError(
                    f"array {_key(index)} ({variable.path}) has shape {tuple(value.shape)}"
                )
            if digests is not None and _digest(value) != digests[index]:
                raise CheckpointError(
                    f"array {_key(index)} ({variable.path}) fails its SHA-256"
                )
        for index, variable in enumerate(variables):
            variable.assign(state[_key(index)])
        return step

    def restore_latest(self, model):
        """Restores the newest usable checkpoint into `model` (its optimizer
        built: `model.optimizer.build(model.trainable_variables)`).

        Returns:
            The restored step, or 0 when there is no usable checkpoint.

        Raises:
            CheckpointMismatchError: the newest checkpoint is of another model.
            CheckpointError: there are checkpoints, and none is usable.
        """
        self.wait()
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self._load(step, model)
            except CheckpointError as error:
                # Set aside (kept for a look, never deleted), so that the run
                # can write this step again.
                aside = f"{self.path(step)}.damaged-{int(time.time())}"
                os.replace(self.path(step), aside)
                _warn(f"checkpoint {self.path(step)} is damaged ({error}); moved it "
                      f"to {aside} and trying the previous one.")
                continue
            logging.info("Restored %s", self.path(step))
            self._manager.reload()
            return restored
        if steps:
            raise CheckpointError(
                f"None of the {len(steps)} checkpoints in {self.directory} (steps "
                f"{steps}) is usable (see the warnings above). Move them away to "
                "start over."
            )
        return 0

    def close(self):
        self.wait()
        self._manager.close()

    def read(self, step):
        """(meta dict, [NumPy arrays in variable order]) of checkpoint `step`,
        without a model (tools and tests)."""
        ocp = self._ocp
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]
        _check_meta(meta, step)
        targets = {
            _key(i): np.zeros(shape, dtype=dtype)
            for i, (_, shape, dtype) in enumerate(meta["variables"])
        }
        state = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(targets))
        )["state"]
        return meta, [np.asarray(state[_key(i)]) for i in range(len(targets))]


def _warn(message):
    logging.warning("%s", message)
    print(f"WARNING: {message}", flush=True)


class WorkdirLock:
    """An exclusive claim on a workdir: `<workdir>/LOCK` holds the owner's
    host, pid and start time. A second trainer on the same workdir gets a
    `WorkdirInUseError` naming the holder; a lock left by a process that is gone
    (same host, no such pid) is taken over with a warning.

    Use as a context manager, or `acquire()` / `release()`.
    """

    def __init__(self, workdir):
        self.path = os.path.join(workdir, "LOCK")
        self._held = False

    def acquire(self):
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise WorkdirInUseError(
                        f"The workdir {os.path.dirname(self.path)} is in use by "
                        f"process {holder.get('pid')} on {holder.get('host')} (since "
                        f"{time.ctime(holder.get('since', 0))}; {self.path}). Use another "
                        "--workdir, or stop that run; remove the LOCK file only if "
                        "that process is gone."
                    ) from None
                _warn(f"taking over {self.path}, left by {holder or 'an unreadable lock'}")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise RuntimeError(f"Could not take {self.path}")

    def _holder(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(holder):
        if holder.get("host") != socket.gethostname():
            return False  # another host's process: cannot tell, assume alive
        try:
            os.kill(int(holder.get("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError):
            return False
        return False

    def release(self):
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
