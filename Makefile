# nanoseek: `make test` and `make demo` work on a fresh clone with nothing but Python installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo experiments clean

install: $(STAMP)

# torch is pinned first: 2.13.0 is a local CPU wheel here; an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(VENV)/bin/nanoseek demo

# The paper ablations, full plans (3 seeds each; finished runs are reused): docs/RESULTS.md and the README table.
experiments: install
	$(VENV)/bin/nanoseek experiment all --results docs/RESULTS.md --readme README.md

clean:
	rm -rf $(VENV) runs .pytest_cache
