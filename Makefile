# The newcomer's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint lock zoo clean

setup: $(STAMP)

# Idempotent: reinstalls only when the lock file or the package metadata changed.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow

lint: setup
	$(VENV)/bin/ruff check graphopt passes targets tools tests

zoo: setup
	$(PY) -m tools.zoo

# Re-resolve the pinned closure from requirements.in (needs only the registries).
lock:
	rm -rf /tmp/graphopt-lock && $(PYTHON) -m venv /tmp/graphopt-lock
	/tmp/graphopt-lock/bin/pip install --quiet -r requirements.in
	{ sed -n '1,2p' requirements.lock; /tmp/graphopt-lock/bin/pip freeze --all --exclude pip \
	  | sed 's/^torch==.*/torch==2.13.0/'; } > requirements.lock.new  # --all: setuptools builds graphopt
	mv requirements.lock.new requirements.lock && rm -rf /tmp/graphopt-lock

clean:
	rm -rf $(VENV) .cache build *.egg-info
