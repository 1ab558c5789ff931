# Every target sets up what it needs from a fresh clone: a virtual environment in .venv with
# the package (editable), its test tools, the CUDA simulator's toolkit, and the frameworks the
# tests and the benchmark run for real (the CPU build of torch, JAX, TensorFlow, numpy-groupies),
# then the numba kernels compiled into their cache, so that the tests and the demo start warm.
#
# Every package is installed at the exact version of requirements/test.lock, so that a fresh clone
# installs the same environment whatever the index has published since. `make lock` makes the lock
# again from pyproject.toml's ranges; tests/test_release.py checks that the two agree.
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
LOCK := requirements/test.lock
LOCK_INPUT := requirements/lock-input.txt
NO_DEPS := requirements/no-deps.txt
LOCK_VENV := .venv-lock
OLDEST := requirements/oldest.txt
OLDEST_VENV := .venv-oldest

.PHONY: install lock test-oldest compile test test-cpu test-cudasim docs docs-linkcheck demo info bench bench-first-call bench-distributed bench-data-parallel bench-codebooks bench-gpu-host fuzz clean

# PIP_CONSTRAINT, unlike --constraint, reaches the isolated environment in which pip builds the
# package, so that its build backend (setuptools) is the lock's too
$(INSTALLED): export PIP_CONSTRAINT = $(abspath $(LOCK))
$(INSTALLED): pyproject.toml $(LOCK) $(NO_DEPS)
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --constraint $(LOCK) pip
	$(PYTHON) -m pip install --quiet --constraint $(LOCK) -e ".[test]"
	$(PYTHON) -m pip install --quiet --constraint $(LOCK) --no-deps -r $(NO_DEPS)
	$(PYTHON) -m centerkern compile
	touch $@

install: $(INSTALLED)

# A fresh resolution of pyproject.toml's ranges (the test extra, which holds every other extra)
# in a new environment, written out as exact pins. The newest pip first and the build backend
# ([build-system] requires) last: the lock pins them too.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON_BOOTSTRAP) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet --constraint $(LOCK_INPUT) ".[test]"
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps -r $(NO_DEPS)
	$(LOCK_VENV)/bin/python -c 'import subprocess, sys, tomllib; subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]], check=True)'
	{ echo "# Exact versions of every package the tests install: \`make lock\` writes this file from a"; \
	  echo "# fresh resolution of pyproject.toml's ranges (with $(LOCK_INPUT)); do not edit it."; \
	  echo "# Resolved $$(date -u +%Y-%m-%d) with Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())') on $$(uname -m)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude centerkern; } > $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "$(LOCK): $$(grep -c '==' $(LOCK)) packages"

# The lowest versions that pyproject.toml accepts of numpy, numba, hypothesis and torch
# ($(OLDEST)), in an environment of their own, on the core and torch tests. Not part of `make test`:
# PyPI has torch releases this old only as CUDA builds, several GB to download. The DTensor tests
# (tests/test_distributed_sharded.py) are left out: they reduce Partial("avg") tensors over gloo,
# which has an AVG reduction from torch 2.8 on.
OLDEST_TESTS := tests/test_properties.py tests/test_errors.py tests/test_out_and_inputs.py \
	tests/test_seed_example.py tests/test_hardening.py tests/test_numba_layouts.py \
	tests/test_compile_cache.py tests/test_oracle.py tests/test_oracle_combinations.py \
	tests/test_torch_module.py tests/test_torch_operators.py tests/test_distributed.py
test-oldest:
	rm -rf $(OLDEST_VENV)
	$(PYTHON_BOOTSTRAP) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --constraint $(OLDEST) -e ".[torch,testing]" pytest
	$(OLDEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(numpy|numba|llvmlite|hypothesis|torch|pytest)=='
	CENTERKERN_CACHE_DIR=$(OLDEST_VENV)/kernel-cache $(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

# the kernel cache again (after a change to the kernels: a stale entry is never loaded, but the
# first call after the change would compile it)
compile: $(INSTALLED)
	$(PYTHON) -m centerkern compile

# The two pytest processes side by side: each is mostly one busy thread (the spawned ranks and
# the simulator wait on each other more than they compute), so on two cores the run takes about
# the time of the longer one; the site is built once one of them is done. Each one's output is
# printed whole when it ends.
test:
	$(MAKE) --jobs=2 --output-sync=target test-cpu test-cudasim docs

# CENTERKERN_REQUIRE_FRAMEWORKS=1: every framework the tests use is installed here, so one that
# does not import fails the run instead of skipping its tests (see tests/conftest.py)
test-cpu: compile
	CENTERKERN_REQUIRE_FRAMEWORKS=1 $(PYTHON) -m pytest -q

# The CUDA backend without a GPU: Numba's simulator must be switched on before Numba is
# imported, so it runs in a pytest process of its own, on the CUDA tests only.
test-cudasim: $(INSTALLED)
	CENTERKERN_REQUIRE_FRAMEWORKS=1 NUMBA_ENABLE_CUDASIM=1 $(PYTHON) -m pytest -q -k "cuda" -p no:cacheprovider

# The documentation site, in docs/_build/html. Warnings are errors: a broken cross-reference, a
# public name without its docstring sections, an example that no longer runs (every example on
# the site runs while it is built: docs/_ext/executed_examples.py). -E: read every page again,
# so that every example runs each time.
docs: $(INSTALLED)
	$(PYTHON) -m sphinx -b html -E -W --keep-going -q docs docs/_build/html
	@echo "the site: docs/_build/html/index.html"

# every external address the site links to (the intersphinx entries of docs/_inventories among
# them), checked against the live sites: needs a network, so it is not part of `make test`
docs-linkcheck: $(INSTALLED)
	$(PYTHON) -m sphinx -b linkcheck -q docs docs/_build/linkcheck

demo: $(INSTALLED)
	$(PYTHON) -m centerkern demo

info: $(INSTALLED)
	$(PYTHON) -m centerkern info

bench: $(INSTALLED)
	$(PYTHON) -m centerkern bench

# what a first call costs, each case in a fresh process with an empty kernel cache
bench-first-call: $(INSTALLED)
	$(PYTHON) -m centerkern bench --first-call

# centerkern.distributed on local gloo processes: the data-parallel exchanges by ranks x touched
# classes, then sharded against replicated centers at K = 10^6 and the sharded step at K = 10^7
bench-distributed: $(INSTALLED)
	$(PYTHON) benchmarks/distributed_exchange.py
	$(PYTHON) benchmarks/distributed_sharded.py

# the whole-batch center update under JAX's shard_map and TensorFlow's MirroredStrategy, 2 CPU replicas
bench-data-parallel: $(INSTALLED)
	$(PYTHON) benchmarks/data_parallel.py

# the EMA codebook against vector-quantize-pytorch's one-hot Codebook (forward + update, the update
# alone, peak memory, each memory case in a fresh process) and mini-batch k-means against scikit-learn
bench-codebooks: $(INSTALLED)
	$(PYTHON) benchmarks/codebooks.py

# the cuda backend's host time per call, without a GPU: the real path, the CUDA driver stubbed
bench-gpu-host: $(INSTALLED)
	$(PYTHON) benchmarks/gpu_host_time.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(OLDEST_VENV) .pytest_cache .hypothesis docs/_build docs/_generated
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# A longer fuzzing run than the smoke run inside `make test`.
fuzz: $(INSTALLED)
	$(PYTHON) tests/fuzz_center_loss.py 20000
