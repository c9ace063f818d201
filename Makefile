# Two entry points, each creating the virtual environment on first use:
#   make demo   - build (once) a tiny model and generate text with it
#   make test   - the test suite (CPU; what CI runs)
# python3 must be >= 3.12: with pyenv, the repo's .python-version selects 3.12.1.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu
# The suite is bound by XLA's compiler, which is mostly single-threaded: one pytest worker per core
# (pytest-xdist), each test module on one worker so its fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: demo test test-all test-ray venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else \
		"dzjax needs Python >= 3.12 (jax >= 0.11); got " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/dzjax demo

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-all: venv  # includes the tests marked slow, many more fuzzing examples, the compiler checks
	$(PY) -c 'import triton' 2>/dev/null || $(PY) -m pip install -q 'triton>=3.4' \
	  || echo "triton could not be installed: the compiler checks will skip"
	HYPOTHESIS_PROFILE=all $(PY) -m pytest -q -m '' -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

test-ray: venv  # the Ray Serve replicas on a local cluster (slow; installs the ray extra)
	$(PY) -m pip install -q -e '.[ray,test]'
	$(PY) -m pytest -q -m slow tests/test_ray_serve.py
