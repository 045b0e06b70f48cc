# The README's two commands. Each sets up its own virtualenv (.venv) from
# pyproject.toml first, so a fresh machine needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/default
CONFIG ?= configs/default.py

.PHONY: run test test-fast setup clean

# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set (as on this
# machine): uv installs none, so every process would compile jax and flax
# from source again (test-fast took about 40 s longer).
unexport PYTHONDONTWRITEBYTECODE

EXTRAS := .[test,onnx,serve,tpu]

# uv fetches and unpacks the wheels in parallel (about 15 s from nothing
# here, against about 65 s for pip alone); pip installs them where uv cannot
# reach the package index.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '$(EXTRAS)' \
	  || $(PY) -m pip install --quiet -e '$(EXTRAS)'
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m experiments.main --config=$(CONFIG) --workdir=$(WORKDIR)

# One pytest-xdist worker per core (at most 4); a worker that finishes its
# share takes tests queued for the other.
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses=4 --dist worksteal

test: $(VENV)/.installed
	$(PYTEST) tests

# Everything but the end-to-end runs marked slow (multi-process, commands
# run whole, training runs, pipelines, LoadGen, peers): for the edit-test
# loop.
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) workdirs
