# tf_moe build / test entry points.
#   make venv   - create .venv and install tf_moe[test] (editable)
#   make bazel  - install Debian's bazel-bootstrap (Bazel 4.2.3) if missing
#   make test   - bazel test //tests/... with .venv/bin first on PATH (builds the
#                 custom-call libraries in tf_moe/ops/cc against .venv's TensorFlow)
#   make train  - the main job: build the English corpus if missing, train the
#                 tiny LSTM-MoE (trainers/lstm_moe.py), print test perplexity
#   make demo   - python -m tf_moe.demo (synthetic task, about 15 s)
#   make cuda   - the CUDA custom-call libraries (needs nvcc; installs the
#                 nvidia-cutlass wheel's headers into .venv), in bazel-bin/
#   make clean  - remove Bazel outputs and Python build artifacts
#
# Variables: TARGETS (default //tests/...), BAZEL_ARGS (extra bazel test args),
# ALLOW_NO_TESTS (1: zero test targets is a warning, not an error), ARGS (extra
# flags for train/demo), WORKDIR (train's checkpoints/TensorBoard/summary),
# DATA_DIR (tfds data_dir of the corpus and tokenizer).

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON3 ?= python3
VENV := .venv
VENV_BIN := $(CURDIR)/$(VENV)/bin
PY := $(VENV_BIN)/python
STAMP := $(VENV)/.installed
BAZEL ?= bazel
TARGETS ?= //tests/...
BAZEL_ARGS ?=
WORKDIR ?= runs/lstm_moe_tiny
DATA_DIR ?= $(HOME)/tensorflow_datasets
ALLOW_NO_TESTS ?= 0
ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv bazel test train demo cuda clean distclean

venv: $(STAMP)

# Debian/Ubuntu ship venv's ensurepip separately (python3-venv).
$(VENV)/bin/python:
	$(PYTHON3) -m venv $(VENV) || { rm -rf $(VENV) && \
	  echo "python3 -m venv failed; installing Debian python3-venv" && \
	  $(SUDO) apt-get install -y python3-venv && $(PYTHON3) -m venv $(VENV); }
	$(VENV)/bin/python -m pip install --upgrade pip setuptools wheel

# Re-installs only when setup.py changes (or the stamp is removed).
$(STAMP): setup.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

bazel:
	@if command -v $(BAZEL) >/dev/null 2>&1; then \
	  echo "bazel: $$(command -v $(BAZEL))"; \
	else \
	  echo "bazel not found; installing Debian bazel-bootstrap"; \
	  $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y bazel-bootstrap; \
	fi

# .venv/bin first on PATH: Bazel's py_test runs the first `python3` on PATH
# (.bazelrc passes PATH through with --action_env/--test_env).
# Bazel's test cache does not see the venv's contents: the stamp's mtime is
# passed as a test env var so that cached results are dropped after the venv
# is reinstalled. Bazel exits 4 when the patterns contain no test targets.
test: venv bazel
	@rc=0; \
	PATH="$(VENV_BIN):$$PATH" $(BAZEL) test \
	  --test_env=TF_MOE_VENV_STAMP="$$(stat -c %Y $(STAMP))" \
	  --repo_env=TF_MOE_PYTHON="$(PY)" \
	  $(BAZEL_ARGS) -- $(TARGETS) || rc=$$?; \
	if [ $$rc -eq 4 ]; then \
	  echo "WARNING: no test targets found in $(TARGETS)"; \
	  if [ "$(ALLOW_NO_TESTS)" = 1 ]; then rc=0; fi; \
	fi; \
	exit $$rc

# Resumes from the newest checkpoint in $(WORKDIR); remove it to start over.
train: venv
	$(PY) -m trainers.lstm_moe --config=configs/lstm_moe_tiny.py \
	  --workdir=$(WORKDIR) --config.data.data_dir=$(DATA_DIR) $(ARGS)

demo: venv
	$(PY) -m tf_moe.demo $(ARGS)

# CUTLASS is header-only C++: the wheel (no Python deps needed) carries the
# headers that @local_cutlass points Bazel at.
CUTLASS_WHEEL ?= nvidia-cutlass==4.2.0.0
cuda: venv bazel
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" \
	  || $(PY) -m pip install --no-deps '$(CUTLASS_WHEEL)'
	PATH="$(VENV_BIN):$$PATH" $(BAZEL) build --repo_env=TF_MOE_PYTHON="$(PY)" \
	  //tf_moe/ops/cc:libtf_moe_ffi_cuda.so \
	  //tf_moe/ops/cc_dropless:libtf_moe_dropless_ffi_cuda.so

clean:
	-command -v $(BAZEL) >/dev/null 2>&1 && $(BAZEL) clean
	rm -rf build dist *.egg-info .eggs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

# Also removes the virtualenv and Bazel's whole output base.
distclean: clean
	-command -v $(BAZEL) >/dev/null 2>&1 && $(BAZEL) clean --expunge
	rm -rf $(VENV)
