# Set-up and everyday commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q
# torch first, pinned: it is the CPU build on these machines' disk; a bare or newer
# torch pulls a multi-GB CUDA build. constraints.txt keeps it pinned for every later install.
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench fuzz clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/loraflight demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check engine federation tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench

fuzz: $(STAMP)
	$(PY) -m bench fuzz --cases 100000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
