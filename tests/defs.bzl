"""Test macros for tf_moe."""

# Keras backends every test runs under by default.
DEFAULT_BACKENDS = ["tensorflow", "jax"]

def tf_moe_py_test(
        name,
        srcs,
        backends = DEFAULT_BACKENDS,
        deps = [],
        size = "medium",
        shard_count = None,
        env = {},
        tags = [],
        **kwargs):
    """One py_test per Keras backend, plus a test_suite grouping them.

    Creates `<name>_<backend>` (e.g. `routing_test_tensorflow`,
    `routing_test_jax`) with `KERAS_BACKEND=<backend>` in its environment, and
    a `test_suite` called `<name>` that runs all of them.

    Args:
      name: base name; the test_suite's name.
      srcs: Python sources; srcs[0] is the test's main file.
      backends: Keras backends to run under.
      deps: extra deps; "//:tf_moe" is always added.
      size: Bazel test size (medium = 300 s timeout).
      shard_count: optional Bazel sharding (absltest supports it).
      env: extra environment variables (KERAS_BACKEND is set per backend).
      tags: tags added to every generated test.
      **kwargs: passed to every py_test (data, args, timeout, flaky, ...).
    """
    if not srcs:
        fail("tf_moe_py_test(%s): srcs must not be empty" % name)
    all_deps = list(deps)
    if "//:tf_moe" not in all_deps:
        all_deps.append("//:tf_moe")

    tests = []
    for backend in backends:
        test_name = "%s_%s" % (name, backend)
        test_env = dict(env)
        test_env["KERAS_BACKEND"] = backend
        native.py_test(
            name = test_name,
            srcs = srcs,
            main = srcs[0],
            deps = all_deps,
            env = test_env,
            size = size,
            shard_count = shard_count,
            python_version = "PY3",
            srcs_version = "PY3",
            tags = tags + ["keras_backend_" + backend],
            **kwargs
        )
        tests.append(":" + test_name)

    # No `tags` here: on a test_suite they act as a filter, not as labels.
    native.test_suite(
        name = name,
        tests = tests,
    )
