#!/bin/sh
# Stub for @remote_coverage_tools (offline shim): coverage is not supported.
echo "remote_coverage_tools stub: bazel coverage is not supported in tf_moe" >&2
exit 0
