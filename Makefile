# sparkdl — two set-up commands: `make demo` and `make test`.
# The torch pin matters: an unpinned torch pulls several GB of CUDA packages.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# The compat environment: Spark 3.5 LTS with the petastorm-era stack petastorm still runs on
# (petastorm imports pyarrow.filesystem, gone in pyarrow 16, and its reads fail on pyarrow 15).
COMPAT      ?= .venv-compat
COMPAT_SPEC ?= "pyspark==3.5.9" "pyarrow==14.0.2" "numpy<2" "pandas==2.2.*" "petastorm==0.12.1"
CPY         := $(COMPAT)/bin/python
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYARROW_IGNORE_TIMEZONE = 1

.PHONY: venv venv-compat demo test test-compat lint typecheck test-unit test-fast bench clean

# The venv is rebuilt when setup.cfg or this Makefile changes; otherwise reused.
$(VENV)/.installed: setup.cfg Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

venv: $(VENV)/.installed

# petastorm 0.12.1, not 0.13.1: 0.13.1 pins setuptools<70, which torch's requirements refuse.
# sparkdl goes in with --no-deps so that its own (newer) lower bounds cannot pull the stack up.
$(COMPAT)/.installed: setup.cfg Makefile
	$(PYTHON) -m venv $(COMPAT)
	$(CPY) -m pip install -q --upgrade pip
	$(CPY) -m pip install -q "$(TORCH_SPEC)"
	$(CPY) -m pip install -q $(COMPAT_SPEC) "$(TORCH_SPEC)" tqdm pillow torchmetrics "tomli>=1.1; python_version<'3.11'" \
		matplotlib pytest pytest-timeout
	$(CPY) -m pip install -q --no-deps -e .
	touch $@

venv-compat: $(COMPAT)/.installed

demo: venv
	PYSPARK_PYTHON=$(abspath $(PY)) $(PY) jobs/train.py --config jobs/configs/digits.toml --set run.run_dir=runs/demo --set run.mode=overwrite

test: venv
	PYSPARK_PYTHON=$(abspath $(PY)) PYTHONPATH=$(CURDIR) $(PY) -m pytest -q tests

# The same suite on Spark 3.5 LTS + pyarrow 14 + petastorm: the petastorm tests skipped by
# `make test` run here. COMPAT_TESTS narrows it (e.g. COMPAT_TESTS="-m unit tests").
COMPAT_TESTS ?= tests
test-compat: venv-compat
	PYSPARK_PYTHON=$(abspath $(CPY)) PYTHONPATH=$(CURDIR) $(CPY) -m pytest -q $(COMPAT_TESTS)

test-unit: venv
	$(PY) -m pytest -q -m "unit" tests

lint: venv
	$(VENV)/bin/ruff check sparkdl jobs tests data benchmarks
	$(VENV)/bin/ruff format --check sparkdl jobs tests data benchmarks

typecheck: venv
	$(VENV)/bin/mypy sparkdl

bench: venv
	PYSPARK_PYTHON=$(abspath $(PY)) $(PY) -m benchmarks all

clean:
	rm -rf $(VENV) .venv-compat runs .pytest_cache build *.egg-info
