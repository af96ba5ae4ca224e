# `make demo` and `make test` build the virtual environment themselves when it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.evoplug-installed
# pytest-xdist workers for `make test` (auto: one per core); each test file runs on one worker,
# so a module's fixtures are built once
TEST_WORKERS ?= auto

.PHONY: venv demo test test-all bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/torch.txt requirements/dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q -e '.[test,timm,plot,mm]'
	@# yapf (MMEngine imports it) writes its grammar pickles on its first import: here, once, not
	@# by two test workers at once (one read a half-written pickle: EOFError at collection)
	$(PY) -c "import importlib.util as u; u.find_spec('yapf') and __import__('yapf')"
	@touch $(STAMP)

# extra arguments for the demo: `make demo ARGS="--distill-steps 50 --repeats 1"`
ARGS ?=

demo: venv
	$(PY) examples/demo.py $(ARGS)

# the quick suite (CI): all but the tests marked slow; `make test-all` runs those too
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

test-all: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: venv
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
