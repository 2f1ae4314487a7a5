"""Where a trainer runs: the flags that spread it over devices and hosts.

- JAX: `--mesh=batch:2,expert:4` trains expert-parallel on a
  `tf_moe.sharding.ExpertParallel` mesh (set for the whole program, before the
  model is built). Several processes (hosts): `--num_processes`,
  `--process_id` and `--coordinator_address` (or, on Cloud TPU and SLURM,
  `--jax_distributed` alone) call `jax.distributed.initialize` first; every
  process runs the same command and feeds its share of each batch.
- TensorFlow: `--strategy=mirrored` (the local GPUs or CPUs),
  `multi_worker_mirrored` (TF_CONFIG) or `--tpu=NAME` trains data-parallel
  under `tf.distribute`.

`train.batch_size` is always the global batch: the sum over devices (and
processes).

Owns: the distribution flags, `setup`, `is_chief`. Does not own: the
layouts (tf_moe.sharding), the training loop (trainers/loop.py).
"""

import contextlib

import keras
from absl import flags

STRATEGIES = ("mirrored", "multi_worker_mirrored")

_MESH = flags.DEFINE_string(
    "mesh", None, "JAX: expert-parallel mesh 'batch:B,expert:X[,model:M]' over all devices."
)
_STRATEGY = flags.DEFINE_enum(
    "strategy", None, STRATEGIES, "TensorFlow: tf.distribute strategy (data parallel)."
)
_TPU = flags.DEFINE_string("tpu", None, "Cloud TPU name or 'local' (TF backend, TPUStrategy).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "JAX multi-process: host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "JAX multi-process: processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "JAX multi-process: this process.")
_JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "JAX: call jax.distributed.initialize (found from the environment on Cloud "
    "TPU and SLURM when --coordinator_address etc. are unset).",
)

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None,
    "Split the host CPU into this many devices (to try a mesh or a strategy "
    "without accelerators; tests). JAX: XLA's host platform device count; "
    "TensorFlow: logical CPU devices.",
)

_STATE = {"strategy": None}


def _split_cpu(backend, count):
    if backend == "jax":
        import os

        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise ValueError(
                "`--cpu_devices` must take effect before JAX starts its backends. "
                f"Received: --cpu_devices={count}"
            )
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
    )


def _check_flags(backend):
    jax_flags = {"--mesh": _MESH.value, "--coordinator_address": _COORDINATOR.value,
                 "--num_processes": _NUM_PROCESSES.value, "--process_id": _PROCESS_ID.value,
                 "--jax_distributed": _JAX_DISTRIBUTED.value or None}
    tf_flags = {"--strategy": _STRATEGY.value, "--tpu": _TPU.value}
    wrong = jax_flags if backend != "jax" else tf_flags
    for name, value in wrong.items():
        if value is not None:
            other = "JAX" if wrong is jax_flags else "TensorFlow"
            raise ValueError(
                f"`{name}` is for the {other} backend; this run uses "
                f"KERAS_BACKEND={backend}. Received: {name}={value!r}"
            )
    if _STRATEGY.value and _TPU.value:
        raise ValueError(
            "Pass one of `--strategy` and `--tpu`. Received: "
            f"--strategy={_STRATEGY.value!r}, --tpu={_TPU.value!r}"
        )


def _tf_strategy():
    import tensorflow as tf

    if _TPU.value:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="" if _TPU.value == "local" else _TPU.value
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if _STRATEGY.value == "mirrored":
        devices = None
        if _CPU_DEVICES.value and not tf.config.list_logical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if _STRATEGY.value == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return None


def _data_shards(distribution):
    return getattr(distribution, "num_data_shards", None) or getattr(
        distribution, "num_replicas_in_sync", 1
    )


def setup(config):
    """Joins the job and sets the distribution of the flags; call first.

    Returns:
        (scope, description): a context manager to build and compile the
        model in, and a dict for the run's summary.

    Raises:
        ValueError: a flag of the other backend; a global batch
            (`train.batch_size`) not divisible by the data shards.
    """
    backend = keras.backend.backend()
    _check_flags(backend)
    if _CPU_DEVICES.value:
        _split_cpu(backend, _CPU_DEVICES.value)
    description = {}
    if backend == "jax":
        from tf_moe import sharding

        if _JAX_DISTRIBUTED.value or (_NUM_PROCESSES.value or 1) > 1:
            sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        import jax

        description.update(processes=jax.process_count(), devices=jax.device_count())
        if _MESH.value:
            distribution = sharding.expert_parallel(_MESH.value)
            _check_batch(config, distribution.num_data_shards, f"--mesh={_MESH.value}")
            keras.distribution.set_distribution(distribution)
            description["mesh"] = distribution.mesh_sizes
        return contextlib.nullcontext(), description
    strategy = _tf_strategy()
    _STATE["strategy"] = strategy
    if strategy is None:
        return contextlib.nullcontext(), description
    _check_batch(config, strategy.num_replicas_in_sync, f"{type(strategy).__name__}")
    description.update(strategy=type(strategy).__name__, replicas=strategy.num_replicas_in_sync)
    return strategy.scope(), description


def _check_batch(config, shards, where):
    if config.train.batch_size % shards:
        raise ValueError(
            f"`train.batch_size` (the global batch) must be divisible by the {shards} "
            f"data shards of {where}. Received: train.batch_size={config.train.batch_size}"
        )


def is_chief():
    """Whether this process writes the run's files (checkpoints, TensorBoard,
    summary): process 0 of a JAX job, worker 0 under MultiWorkerMirrored."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    strategy = _STATE["strategy"]
    return strategy is None or getattr(strategy.extended, "should_checkpoint", True)
