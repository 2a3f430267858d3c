# Two commands set up a fresh machine:
#   make run   - install everything into .venv, then run the main job (dvc repro on the embedded default)
#   make test  - install everything into .venv, then run the whole test suite
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The machine's pip config lists local mirror indexes that lack most projects; pip warns once per
# project. Keep the install output readable (sed, unlike grep -v, never fails the pipe).
QUIET_PIP := sed -e '/is ignored: it is neither a file nor a directory/d'

.PHONY: install run test lint lock clean bench-deps

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	@echo "installing torch (CPU build) and the pinned dependencies into $(VENV) ..."
	$(PY) -m pip install -q -c requirements.lock "torch==2.13.0" 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, sys; sys.exit(0 if not torch.version.cuda else 'a CUDA torch was installed')"
	touch $(STAMP)

# SSD_RUN_STARTED (read when make starts, before the install) lets the evaluate stage record the
# whole run's wall time in metrics/eval.json; the summary prints the headline and the MLflow UI command.
run: export SSD_RUN_STARTED := $(shell date +%s)
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	$(PY) -m pipeline summary

test: install
	$(PY) -m ruff check ssd_core pipeline tests benchmarks infra
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check ssd_core pipeline tests benchmarks infra

# Re-generate the lock after changing pyproject.toml dependencies (run on a fresh venv).
lock: install
	{ head -n 2 requirements.lock; $(PY) -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV)

# Benchmark-only reference: torchvision (CUDA wheel, no deps) in .bench, imported through
# ../shared/tools/torchvision_cpu_shim.py. Never a project dependency.
bench-deps: install
	$(PY) -m pip install -q --no-deps --target .bench torchvision==0.28.0 2>&1 | $(QUIET_PIP)
