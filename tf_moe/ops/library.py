"""Finding, loading and registering the Bazel-built custom-call libraries.

Each family of custom calls (dispatch/combine in `tf_moe/ops/cc`, the grouped
matmul in `tf_moe/ops/cc_dropless`) is one `NativeLibrary`: a TensorFlow op
library (CPU kernels, XLA lowering) and XLA FFI handler libraries for JAX on
CPU ("Host" symbols) and CUDA ("Cuda" symbols). This module is the one place
that decides where the files are searched, which JAX platforms have handlers,
and what the error says when something is missing.

Search order for `tf_moe/ops/<package>/lib*.so`: `$TF_MOE_OPS_DIR`,
`tf_moe/ops/<package>/` next to this module (e.g. Bazel runfiles) and,
outside Bazel tests, the checkout's `bazel-bin/tf_moe/ops/<package>/`.

Owns: lookup, loading, FFI registration, availability, error text.
Does not own: the calls themselves or their gradients (`custom_call.py`,
`grouped_matmul.py` pass a `register_tf_gradients` hook).
"""

import ctypes
import functools
import os

import keras

LIBRARY_DIR_ENV = "TF_MOE_OPS_DIR"


class CustomCallUnavailableError(RuntimeError):
    """A custom-call library is not built or cannot run here."""


def library_dirs(package):
    """Directories searched for the libraries of `tf_moe/ops/<package>`, in
    order (see the module docstring)."""
    dirs = []
    if os.environ.get(LIBRARY_DIR_ENV):
        dirs.append(os.environ[LIBRARY_DIR_ENV])
    here = os.path.dirname(os.path.abspath(__file__))
    dirs.append(os.path.join(here, package))
    if "TEST_SRCDIR" not in os.environ:  # not inside a (hermetic) Bazel test
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        dirs.append(os.path.join(root, "bazel-bin", "tf_moe", "ops", package))
    return dirs


def find_library(name, dirs):
    """Path of library file `name` in the first of `dirs` that holds it, or None."""
    for directory in dirs:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def jax_platform():
    """The JAX default backend as the FFI registration knows it: "cpu",
    "gpu" (CUDA; JAX reports "gpu" or "cuda" by version) or e.g. "tpu"."""
    import jax

    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda") else platform


# JAX platform -> (handler symbol suffix, XLA platform name).
_JAX_PLATFORMS = {"cpu": ("Host", "cpu"), "gpu": ("Cuda", "CUDA")}


class NativeLibrary:
    """One family of custom calls: its library files, FFI targets and the
    words its errors use.

    Args:
        feature: how users ask for it, for error messages (e.g.
            "dispatch='custom_call'").
        alternative: what to use instead, for error messages.
        package: the folder under `tf_moe/ops` holding the libraries.
        tf_library, host_library, cuda_library: the file names.
        targets: dict FFI target name -> handler symbol without its suffix.
        cuda_targets: extra targets with CUDA handlers only.
        build_hint: how to build the libraries.
        register_tf_gradients: fn(loaded TF module), called once after the TF
            op library loads.
    """

    def __init__(self, *, feature, alternative, package, tf_library, host_library,
                 cuda_library, targets, build_hint, register_tf_gradients,
                 cuda_targets=None):
        self.feature = feature
        self.alternative = alternative
        self.package = package
        self.tf_library = tf_library
        self.host_library = host_library
        self.cuda_library = cuda_library
        self.targets = dict(targets)
        self.cuda_targets = dict(cuda_targets or {})
        self.build_hint = build_hint
        self._register_tf_gradients = register_tf_gradients

    def dirs(self):
        return library_dirs(self.package)

    def require(self, name):
        """Path of library file `name`; raises with the build hint if missing."""
        path = find_library(name, self.dirs())
        if path is None:
            raise CustomCallUnavailableError(
                f"{self.feature} needs {name}, which was not found in "
                f"{self.dirs()}. {self.build_hint}"
            )
        return path

    @functools.cached_property
    def _tf_module(self):
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            raise CustomCallUnavailableError(
                f"{self.feature} on the TensorFlow backend has CPU kernels only, "
                f"and TensorFlow sees a GPU. Use {self.alternative}, or the JAX "
                "backend for the CUDA kernels."
            )
        path = self.require(self.tf_library)
        try:
            module = tf.load_op_library(path)
        except tf.errors.NotFoundError as error:
            raise CustomCallUnavailableError(
                f"{path} does not load into TensorFlow {tf.__version__} (built "
                f"against another TensorFlow?): {error}. {self.build_hint}"
            ) from error
        self._register_tf_gradients(module)
        return module

    def tf_ops(self):
        """The loaded TF op library (loaded and its gradients registered once)."""
        return self._tf_module

    def register_jax(self, platform=None):
        """Registers the FFI targets for JAX `platform` (default: the default
        backend's), once per platform."""
        return self._register_jax(platform or jax_platform())

    @functools.lru_cache(maxsize=None)
    def _register_jax(self, platform):
        import jax

        if platform not in _JAX_PLATFORMS:
            raise CustomCallUnavailableError(
                f"{self.feature} runs on CPU and CUDA GPUs. Received: JAX "
                f"platform {platform!r}. Use {self.alternative}."
            )
        suffix, xla_platform = _JAX_PLATFORMS[platform]
        name = self.host_library if platform == "cpu" else self.cuda_library
        lib = ctypes.cdll.LoadLibrary(self.require(name))
        targets = dict(self.targets)
        if platform == "gpu":
            targets.update(self.cuda_targets)
        for target, symbol in targets.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol + suffix)),
                platform=xla_platform,
            )
        return True

    def require_available(self):
        """Loads and registers the library for the current Keras backend and
        device.

        Raises:
            CustomCallUnavailableError: with the reason and how to build it.
        """
        backend = keras.backend.backend()
        if backend == "tensorflow":
            self.tf_ops()
        elif backend == "jax":
            self.register_jax()
        else:
            raise CustomCallUnavailableError(
                f"{self.feature} supports the 'tensorflow' and 'jax' Keras "
                f"backends. Received: backend={backend!r}. Use {self.alternative}."
            )

    @functools.lru_cache(maxsize=None)
    def _available(self, backend, platform):
        del backend, platform  # cache keys
        try:
            self.require_available()
        except CustomCallUnavailableError:
            return False
        return True

    def is_available(self):
        """Whether the library runs with the current Keras backend on its
        default device (built, loadable, with kernels for the device)."""
        backend = keras.backend.backend()
        return self._available(backend, jax_platform() if backend == "jax" else None)
