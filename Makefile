# Every target sets up what it needs from a fresh clone: a virtual environment in .venv with
# the package (editable), its test tools, the CUDA simulator's toolkit, and the frameworks the
# tests and the benchmark run for real (the CPU build of torch, JAX, TensorFlow, numpy-groupies),
# then the numba kernels compiled into their cache, so that the tests and the demo start warm.
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install compile test test-cpu test-cudasim docs demo info bench bench-first-call bench-distributed bench-data-parallel fuzz clean

$(INSTALLED): pyproject.toml
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[test]"
	$(PYTHON) -m centerkern compile
	touch $@

install: $(INSTALLED)

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

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis docs/_build docs/_generated
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# A longer fuzzing run than the smoke run inside `make test`.
fuzz: $(INSTALLED)
	$(PYTHON) tests/fuzz_center_loss.py 20000
