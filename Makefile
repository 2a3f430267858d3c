# Two commands set up a fresh machine:
#   make run   - install everything into .venv, then run the main job (dvc repro on the embedded default)
#   make test  - install everything into .venv, then run the whole test suite
# Day to day: make test-fast (everything but the slow, Ray and DVC tests, about 90 s), make format.
# Supply chain (not part of make test; both need the network):
#   make lock  - re-resolve requirements.lock (with hashes) after a change of pyproject.toml's dependencies
#   make audit - look up every locked version in a vulnerability database (pip-audit)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pip-tools (make lock) and pip-audit (make audit) live in a venv of their own, so that their dependencies
# never mix with the project's; requirements-tools.lock pins them with hashes.
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed-stamp
# The machine's pip config lists local mirror indexes that lack most projects; pip warns once per
# project. Keep the install output readable (sed, unlike grep -v, never fails the pipe).
QUIET_PIP := sed -e '/is ignored: it is neither a file nor a directory/d'
# pip-compile writes every hash of each pinned version that the configured indexes serve (all platforms),
# keeps the versions already in the output file (make lock LOCK_ARGS="--upgrade-package NAME" moves one),
# and leaves index URLs out (each machine's pip config names its own).
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(TOOLS_VENV)/bin/pip-compile -q --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links

.PHONY: install run test test-fast lint format lock audit clean bench-deps

install: $(STAMP)

# Hash-checked: every file pip fetches must have a sha256 listed in requirements.lock, or the install stops.
# --no-deps: the lock is the whole environment (pip check below proves it complete). Nothing is built in an
# isolated environment, which pip would fill with build tools it does not hash-check: setuptools comes first,
# from the lock, and builds the lock's one sdist (antlr4-python3-runtime) and the project itself (editable;
# a checkout cannot be hashed). An sdist that needs another build backend fails here; lock that backend too.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	@echo "installing the locked dependencies (hash-checked, torch is the CPU build) into $(VENV) ..."
	$(PY) -m pip install -q --require-hashes --no-deps \
		-r <(awk '/^[^ #]/ {keep = ($$0 ~ /^setuptools==/)} keep' requirements.lock) 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q --require-hashes --no-deps --no-build-isolation -r requirements.lock 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	$(PY) -m pip check
	$(PY) -c "import torch, sys; sys.exit(0 if not torch.version.cuda else 'a CUDA torch was installed')"
	touch $(STAMP)

# SSD_RUN_STARTED (read when make starts, before the install) lets the evaluate stage record the
# whole run's wall time in metrics/eval.json; the summary prints the headline and the MLflow UI command.
run: export SSD_RUN_STARTED := $(shell date +%s)
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	$(PY) -m pipeline summary

LINTED := ssd_core pipeline tests benchmarks infra

# Python keeps compiled bytecode (__pycache__, git-ignored) even where the environment turns that off, as this
# machine's does (PYTHONDONTWRITEBYTECODE=1): every Python process the targets start (test workers, `python -m
# pipeline`, servers, Ray workers) would otherwise compile what it imports from source. make test-fast: 105 -> 85-92 s.
export PYTHONDONTWRITEBYTECODE :=

# Tests run in TEST_WORKERS processes (pytest-xdist): much of the slow tests' time is spent waiting on servers,
# Ray and subprocesses, so two workers on CI's 2 cores took the suite from 29 to 20 minutes. Every test binds
# free ports and its own folders, so any count works; TEST_WORKERS=0 runs everything in this process. Tests marked
# xdist_group("multinode_ray") (the loopback clusters) run in one process, one after the other (--dist loadgroup).
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=40

# The markers are registered in pyproject.toml: slow (over a few seconds), ray (starts Ray), dvc (runs dvc).
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not ray and not dvc"

lint: install
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

format: install
	$(PY) -m ruff format $(LINTED)
	$(PY) -m ruff check --fix $(LINTED)

$(TOOLS_STAMP): requirements-tools.lock
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q --require-hashes --no-deps --no-build-isolation \
		-r requirements-tools.lock 2>&1 | $(QUIET_PIP)
	$(TOOLS_VENV)/bin/python -m pip check
	touch $(TOOLS_STAMP)

# Re-resolve both locks, keeping every version already locked (the first run reads each version's hashes from
# the index, about 10 minutes; later runs reuse pip-tools' cache). torch is the machine's CPU build, 2.13.0+cpu;
# its pin drops the local label so that the training image's CUDA build (2.13.0+cu128) also satisfies it, while
# the hash still admits only the CPU wheel here.
LOCK_ARGS ?=
lock: $(TOOLS_STAMP)
	$(PIP_COMPILE) $(LOCK_ARGS) --extra dev -o requirements.lock pyproject.toml 2>&1 | $(QUIET_PIP)
	sed -E -i 's/^torch==([0-9.]+)\+cpu /torch==\1 /' requirements.lock
	! grep -qiE '^(nvidia-|triton)' requirements.lock || { echo "requirements.lock: a CUDA package came in"; exit 1; }
	$(PIP_COMPILE) -o requirements-tools.lock requirements-tools.in 2>&1 | $(QUIET_PIP)

# pip-audit reads the pins and hashes of requirements.lock (no resolution, no install) and asks a vulnerability
# service which of those versions have known vulnerabilities; it exits 1 on any. It needs that service: PyPI's
# JSON API (pypi.org/pypi/NAME/VERSION/json, the default) or an OSV API (AUDIT_SERVICE=osv, OSV_URL= for a
# mirror of api.osv.dev). --strict: a package the service cannot answer for fails the audit instead of being
# skipped, so an index mirror without the JSON API gives an error, never "No known vulnerabilities found".
# Answers are cached in .cache/pip-audit.
AUDIT_SERVICE ?= pypi
OSV_URL ?= https://api.osv.dev/v1/query
audit: $(TOOLS_STAMP)
	$(TOOLS_VENV)/bin/pip-audit --disable-pip --require-hashes -r requirements.lock --strict \
		--vulnerability-service $(AUDIT_SERVICE) --osv-url $(OSV_URL) --cache-dir .cache/pip-audit \
		--progress-spinner off

clean:
	rm -rf $(VENV) $(TOOLS_VENV)

# Benchmark-only reference: torchvision (CUDA wheel, no deps) in .bench, imported through
# ../shared/tools/torchvision_cpu_shim.py. Never a project dependency.
bench-deps: install
	$(PY) -m pip install -q --no-deps --target .bench torchvision==0.28.0 2>&1 | $(QUIET_PIP)
