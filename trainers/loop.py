"""The training loop both trainers share: `model.fit` in checkpoint-sized
epochs, automatic resume, TensorBoard, throughput, and the final summary.

Workdir layout:
    <workdir>/config.json        the resolved config of the run
    <workdir>/checkpoints/       ckpt-<step>/ (see trainers/checkpoint.py)
    <workdir>/tensorboard/       scalars (loss, perplexity, aux losses, routing
                                 stats, tokens/s) and the expert-load heatmap
    <workdir>/metrics.csv        the same scalars per epoch, where TensorFlow
                                 is not installed (no TensorBoard)
    <workdir>/summary.json       final metrics
"""

import atexit
import contextlib
import json
import math
import os
import sys
import time

import keras
import numpy as np

import tf_moe
from tf_moe._validation import check_positive, check_positive_int
from trainers.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointSaveError,
    WorkdirInUseError,
    WorkdirLock,
)
from trainers.distribution import is_chief

_LOCKS = {}


def claim_workdir(workdir):
    """Creates `workdir` and holds its `WorkdirLock` until the process exits
    (the chief process; the others share the chief's run). Idempotent.

    Raises:
        RuntimeError: another trainer holds the workdir (names it).
    """
    os.makedirs(workdir, exist_ok=True)
    key = os.path.abspath(workdir)
    if is_chief() and key not in _LOCKS:
        _LOCKS[key] = WorkdirLock(workdir).acquire()
        atexit.register(_LOCKS[key].release)


class ConfigError(ValueError):
    """A config field or flag is invalid (the message names it)."""


@contextlib.contextmanager
def config_errors():
    """Turns the ValueErrors of config checks into `ConfigError`s, which
    `run_main` reports without a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error


def run_main(main):
    """`main` for `absl.app.run`: the run's own errors (a bad config, a
    checkpoint of another model, a failed save, a workdir in use, a
    non-finite loss) end it with their message and exit code 1, without a
    traceback; anything else keeps its traceback."""

    def wrapped(argv):
        try:
            return main(argv)
        except (ConfigError, CheckpointError, CheckpointMismatchError, CheckpointSaveError,
                WorkdirInUseError, NonFiniteLossError) as error:
            name = "ValueError" if isinstance(error, ConfigError) else type(error).__name__
            print(f"ERROR: {name}: {error}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped


class Perplexity(keras.metrics.Metric):
    """exp(mean token cross-entropy) of integer targets and logits, ignoring
    targets equal to `ignore_id` (padding)."""

    def __init__(self, ignore_id=None, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_id = ignore_id
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.cast(y_true, "int32")
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        weight = keras.ops.ones_like(ce)
        if self.ignore_id is not None:
            weight = keras.ops.cast(keras.ops.not_equal(y_true, self.ignore_id), ce.dtype)
        if sample_weight is not None:
            weight = weight * keras.ops.cast(sample_weight, ce.dtype)
        self.total.assign_add(keras.ops.sum(ce * weight))
        self.count.assign_add(keras.ops.sum(weight))

    def result(self):
        return keras.ops.exp(self.total / keras.ops.maximum(self.count, 1.0))

    def get_config(self):
        return {**super().get_config(), "ignore_id": self.ignore_id}


class Throughput(keras.callbacks.Callback):
    """Adds `tokens_per_sec` (over the last `window` steps) to the logs."""

    def __init__(self, tokens_per_step, window=20):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.window = window
        self.times = []
        self.total_tokens = 0
        self.total_seconds = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.times = (self.times + [now])[-self.window :]
        self.total_seconds += now - self._start
        self.total_tokens += self.tokens_per_step
        if logs is not None and len(self.times) > 1:
            seconds = self.times[-1] - self.times[0]
            logs["tokens_per_sec"] = self.tokens_per_step * (len(self.times) - 1) / seconds

    @property
    def mean_tokens_per_sec(self):
        return self.total_tokens / max(self.total_seconds, 1e-9)


class Checkpointing(keras.callbacks.Callback):
    """Saves a checkpoint at the end of every (checkpoint-sized) epoch (every
    process takes part; the chief writes)."""

    def __init__(self, manager):
        super().__init__()
        self.manager = manager

    def on_epoch_end(self, epoch, logs=None):
        model = self.model  # syncs JAX state into the variables
        self.manager.save(int(keras.ops.convert_to_numpy(model.optimizer.iterations)), model, write=is_chief())


class ExpertLoadHeatmap(keras.callbacks.Callback):
    """Writes an image [MoE layers x experts] of expert load to TensorBoard at
    every epoch end (0.5 gray = the uniform share 1/E, white = twice it or
    more)."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        loads = [
            layer.last_routing_stats["expert_load"]
            for layer in tf_moe.metrics.moe_layers(self.model)
        ]
        if not loads:
            return
        width = max(len(load) for load in loads)
        image = np.zeros((len(loads), width), np.float32)
        for row, load in enumerate(loads):
            image[row, : len(load)] = load * len(load) / 2.0  # 0.5 gray = uniform
        image = np.clip(image, 0.0, 1.0)
        # Shape: [1, layers * 16, experts * 16, 1], each cell 16x16 pixels.
        image = np.kron(image, np.ones((16, 16), np.float32))[None, :, :, None]
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "images"))
        with self._writer.as_default():
            tf.summary.image("expert_load", image, step=int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))
        self._writer.flush()


def parameter_counts(model):
    """(total parameters, parameters active per token)."""
    summary = tf_moe.metrics.parameter_summary(model)
    return summary["total"], summary["active"]


# `train.dtype_policy` values: Keras's dtype policies for training.
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def set_dtype_policy(train):
    """Sets Keras's global dtype policy from `train.dtype_policy` (default
    float32) before the model is built. Under a mixed policy the models keep
    their recurrent layers and softmax in float32; `model.compile` adds loss
    scaling for mixed_float16."""
    name = train.get("dtype_policy", "float32")
    if name not in DTYPE_POLICIES:
        raise ConfigError(
            f"`train.dtype_policy` must be one of {DTYPE_POLICIES}. "
            f"Received: train.dtype_policy={name!r}"
        )
    keras.config.set_dtype_policy(name)


def resolve_jit_compile(jit_compile):
    """`train.jit_compile` for `model.compile`, inside the strategy's scope.

    None (unset) means XLA, Keras's own default, on every backend and
    device, except under a TensorFlow strategy over several CPU devices
    (`--strategy=mirrored --cpu_devices=n`, CPU workers): XLA compiles each
    replica's step for one CPU and then finds the other replicas' variables
    on other devices (TensorFlow's "tf.Variable on a different device", see
    https://www.tensorflow.org/xla/known_issues), so there no XLA, and an
    explicit True is refused. (Until 2026-12-03 None also meant no XLA on
    TF on CPU: dropout's random numbers made the compiled step 5-10x slower;
    with `tf_moe.layers.dropout`, Philox, it is as fast as the plain graph or
    faster. docs/status.md, Issue 4; benchmarks/xla_step.py.)
    """
    if keras.backend.backend() == "tensorflow" and _replicas_on_cpus():
        if jit_compile:
            raise ConfigError(
                "`train.jit_compile=True` cannot run under a TensorFlow strategy over "
                "several CPU devices: XLA finds each replica's variables on another "
                "device. Set train.jit_compile=False or leave it unset. Received: "
                "train.jit_compile=True"
            )
        return False
    return True if jit_compile is None else bool(jit_compile)


def _replicas_on_cpus():
    import tensorflow as tf  # TF backend only

    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync == 1:  # (the default strategy has no worker_devices)
        return False
    return all("CPU" in device.upper() for device in strategy.extended.worker_devices)


def check_train_config(train):
    """Raises ValueError naming the first invalid `train.*` field."""
    for name in ("steps", "checkpoint_every", "batch_size", "keep_checkpoints", "log_every"):
        if name in train:
            check_positive_int(f"train.{name}", train[name])
    check_positive_int("train.warmup_steps", train.warmup_steps, minimum=0)
    check_positive("train.learning_rate", train.learning_rate)
    if train.get("clipnorm") is not None:
        check_positive("train.clipnorm", train.clipnorm)
    if train.steps % train.checkpoint_every:
        raise ValueError(
            "`train.steps` must be a multiple of `train.checkpoint_every` (training "
            "runs in checkpoint-sized epochs). Received: "
            f"train.steps={train.steps}, train.checkpoint_every={train.checkpoint_every}"
        )


def check_data_config(data):
    """Raises ValueError naming the first invalid `data.*` field the trainers
    share."""
    check_positive_int("data.sequence_length", data.sequence_length, minimum=2)
    check_positive_int("data.vocab_size", data.vocab_size, minimum=8)
    check_positive_int("data.eval_batches", data.eval_batches, minimum=0)
    if data.get("eval_batch_size") is not None:
        check_positive_int("data.eval_batch_size", data.eval_batch_size)
    if data.data_dir is not None and not isinstance(data.data_dir, str):
        raise ValueError(
            f"`data.data_dir` must be a folder path or None. Received: data.data_dir={data.data_dir!r}"
        )


def eval_batch_size(config):
    """Sequences per evaluation batch: `data.eval_batch_size`, or
    `train.batch_size` when unset. Evaluation routes dropless, so the batch
    size changes memory, never the result."""
    size = config.data.get("eval_batch_size")
    return config.train.batch_size if size is None else size


def check_workdir(workdir):
    if not isinstance(workdir, str) or not workdir.strip():
        raise ValueError(
            "`--workdir` must name a folder for checkpoints, TensorBoard and the "
            f"summary. Received: --workdir={workdir!r}"
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"`--workdir` is a file, not a folder. Received: --workdir={workdir!r}")


def corpus_builder(name, data_dir):
    """`tfds.builder(name, data_dir=...)`, with errors that name the field."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        from tf_moe import data as data_lib

        built_in = data_lib.builders.BUILT_IN
        raise ConfigError(
            f"`data.corpus` must be a tfds dataset: one of the built-in corpora "
            f"{built_in}, or e.g. 'lm1b' / 'wmt14_translate/de-en' prepared in "
            f"`data.data_dir`. Received: data.corpus={name!r}"
        ) from error


def evaluate(model, dataset):
    """`model.evaluate` of every batch of `dataset` (a `tf.data.Dataset`, or
    a list of NumPy (inputs, targets) pairs) as a dict, with the routing
    statistics of its last batch. The number of steps is given: Keras 3.15
    on TensorFlow without XLA returns a wrong mean (5/6 of the loss,
    measured) for a dataset of unknown cardinality evaluated without `steps`."""
    logger = tf_moe.metrics.RoutingStatsLogger()
    if isinstance(dataset, (list, tuple)):
        logs = model.evaluate((batch for batch in dataset), steps=len(dataset),
                              return_dict=True, verbose=0, callbacks=[logger])
        return {**logs, **logger.test_stats}
    steps = int(dataset.cardinality())
    if steps < 0:
        # Unknown: count the batches once, cached so that evaluation reads
        # them from memory instead of running the pipeline (tokenization)
        # again. Evaluation sets are small.
        dataset = dataset.cache()
        steps = int(dataset.reduce(0, lambda count, _: count + 1))
    logs = model.evaluate(dataset, steps=steps, return_dict=True, verbose=0,
                          callbacks=[logger])
    return {**logs, **logger.test_stats}


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Ends training with `NonFiniteLossError` at the first step whose loss is
    NaN or inf, before the epoch's checkpoint can be written (Keras's
    `TerminateOnNaN` only stops, and the run would end with exit code 0)."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            raise NonFiniteLossError(
                f"The training loss is {float(loss)} at step {step}; the run stops "
                "and no checkpoint is written from here (the last good one is "
                "kept). Look at the learning rate (`train.learning_rate`) and "
                "the data."
            )


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


# Per-epoch scalars where TensorFlow (and so TensorBoard) is not installed.
METRICS_CSV = "metrics.csv"


def tensorflow_installed():
    """Whether TensorFlow imports (it is optional on the JAX backend)."""
    try:
        import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        return False
    return True


def fit(model, make_train_data, config, workdir, tokens_per_step, validation_data=None,
        verbose="auto"):
    """Trains `model` to `config.train.steps`, resuming from `workdir`.

    Args:
        model: a compiled Keras model.
        make_train_data: fn(start_step) -> infinite dataset (or generator)
            positioned at `start_step` batches (deterministic for a fixed
            seed).
        config: the run's ConfigDict (uses `config.train`).
        workdir: str.
        tokens_per_step: int, for tokens/s.
        validation_data: dataset evaluated at every checkpoint, or None.

    Returns:
        dict with "start_step", "final_step", "tokens_per_sec", "history".
    """
    train = config.train
    check_train_config(train)
    claim_workdir(workdir)
    if is_chief():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    manager = CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        keep=train.get("keep_checkpoints", 3),
        async_save=bool(train.get("async_checkpoints", False)),
    )
    # Under tf.distribute the optimizer's variables are made in the strategy's
    # scope, like the model's.
    strategy = getattr(model, "distribute_strategy", None)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model.optimizer.build(model.trainable_variables)
        start = manager.restore_latest(model)
    if start:
        print(f"Resuming from step {start} ({manager.path(start)})", flush=True)
    throughput = Throughput(tokens_per_step)
    tb_dir = os.path.join(workdir, "tensorboard")
    callbacks = [StopOnNonFiniteLoss(), throughput, tf_moe.metrics.RoutingStatsLogger(),
                 Checkpointing(manager)]
    if is_chief() and tensorflow_installed():  # one writer of the run's logs
        callbacks += [
            ExpertLoadHeatmap(tb_dir),
            keras.callbacks.TensorBoard(tb_dir, update_freq=train.get("log_every", 50)),
        ]
    elif is_chief():
        # Keras's TensorBoard callback writes through tf.summary; without
        # TensorFlow the scalars of every epoch go to a CSV file instead.
        print(f"TensorFlow is not installed: logging to {os.path.join(workdir, METRICS_CSV)}"
              " instead of TensorBoard", flush=True)
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(workdir, METRICS_CSV), append=True))
    history = {}
    if start < train.steps:
        result = model.fit(
            make_train_data(start),
            steps_per_epoch=train.checkpoint_every,
            epochs=train.steps // train.checkpoint_every,
            initial_epoch=start // train.checkpoint_every,
            validation_data=validation_data,
            callbacks=callbacks,
            verbose=verbose,
        )
        history = result.history
    manager.close()  # waits for a background save
    return {
        "start_step": start,
        "final_step": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "tokens_per_sec": throughput.mean_tokens_per_sec if throughput.total_tokens else None,
        "history": history,
    }


def routing_logs(logs):
    """The `<layer>/<stat>` entries of `evaluate` logs or of a fit history
    (its last epoch), without the validation ones."""
    return {
        key: value[-1] if isinstance(value, list) else value
        for key, value in logs.items()
        if "/" in key and not key.startswith("val_")
    }


def write_summary(workdir, summary):
    """Prints `summary` as a table and writes it to <workdir>/summary.json
    (the chief process)."""
    if is_chief():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    width = max(len(k) for k in summary)
    print("\n== summary ==")
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:.4g}" for k, v in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        print(f"{key:<{width}}  {value}")


class ClipsTheSum:
    """Optimizer mixin: under tf.distribute, clip the gradients summed over
    the replicas, as one device clips its gradient.

    Keras 3.15 on TensorFlow clips each replica's gradient (`clipnorm`,
    `global_clipnorm`, `clipvalue`) before it sums them across replicas:
    the clipped norm is that of a partial gradient, and a run under
    MirroredStrategy trained differently from one device (measured: router
    kernels 0.04 apart after 2 steps of SGD, clipnorm 0.5). Here the
    replicas' gradients are all-reduced first (one more all-reduce per step),
    the sum is clipped, and each replica's gradient is scaled by the
    clipped/unclipped ratio, so that Keras's own sum is the clipped sum. (A
    sparse gradient's norm is taken of its sum here; one-device Keras takes
    it of the IndexedSlices values, counting a repeated row once per
    occurrence.)
    """

    def _clip_gradients(self, grads):
        if keras.backend.backend() != "tensorflow" or not (
            self.clipnorm or self.global_clipnorm or self.clipvalue
        ):
            return super()._clip_gradients(grads)
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if not tf.distribute.has_strategy() or context is None or (
            context.num_replicas_in_sync == 1
        ):
            return super()._clip_gradients(grads)
        present = [g for g in grads if g is not None]
        summed = [tf.convert_to_tensor(g) for g in context.all_reduce("sum", present)]
        clipped = iter(super()._clip_gradients(summed))
        summed = iter(summed)
        out = []
        for g in grads:
            if g is None:
                out.append(None)
                continue
            total, clip = next(summed), next(clipped)
            if self.clipvalue:  # elementwise
                out.append(tf.convert_to_tensor(g) * tf.math.divide_no_nan(clip, total))
                continue
            # Norm clipping scales each tensor by one factor; sparse gradients
            # (IndexedSlices of an embedding) stay sparse.
            scale = tf.math.divide_no_nan(tf.norm(clip), tf.norm(total))
            if isinstance(g, tf.IndexedSlices):
                out.append(tf.IndexedSlices(g.values * scale, g.indices, g.dense_shape))
            else:
                out.append(g * scale)
        return out


class Adam(ClipsTheSum, keras.optimizers.Adam):
    """`keras.optimizers.Adam`, clipping the sum over tf.distribute replicas."""


def make_optimizer(train):
    """Adam with linear warmup to `train.learning_rate`, then cosine decay,
    gradients clipped to norm `train.clipnorm` (default 1.0)."""
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=max(1, train.steps - train.warmup_steps),
        alpha=0.1,
    )
    return Adam(schedule, clipnorm=train.get("clipnorm", 1.0))


def unigram_perplexity(train_counts, test_tokens):
    """Perplexity of an add-one-smoothed unigram model.

    Args:
        train_counts: int array [V] of token counts in the training split.
        test_tokens: int array of evaluated tokens.
    """
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(np.exp(-np.mean(np.log(probs[test_tokens]))))
