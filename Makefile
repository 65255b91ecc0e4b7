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
	$(VENV)/bin/ruff check loraflight engine federation tests bench
	$(VENV)/bin/ruff format --check loraflight engine federation tests bench
	rm -rf .typecheck && mkdir -p .typecheck/loraflight
	cp loraflight/*.py loraflight/py.typed .typecheck/loraflight/
	ln -s ../../engine .typecheck/loraflight/engine && ln -s ../../federation .typecheck/loraflight/federation
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml

bench: $(STAMP)
	$(PY) -m bench

fuzz: $(STAMP)
	$(PY) -m bench fuzz --cases 100000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .typecheck build dist
