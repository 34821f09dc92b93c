# Two commands on a fresh machine: `make demo` (the offline pipeline) and `make test`.
# Both create the virtual environment first when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
VENV := .venv
UV := .tools/bin/uv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install system-packages test test-fast demo lint format bench ui clean

install: $(VENV)/.installed

# uv installs the exact versions pinned in uv.lock (same environment today and next month).
$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra dev --python $(PYTHON)
	touch $@

# SLURM (Debian's slurm-wlm) for the tests' two-node cluster on loopback (tests/test_slurm.py):
# installed where this runs as root with apt-get, without starting the system's daemons
# (policy-rc.d); elsewhere, or if that fails, the SLURM tests are skipped, saying why (with
# CI=true in the environment they fail instead).
system-packages:
	@if command -v slurmctld >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "SLURM not installed (slurm-wlm needs root and apt-get): SLURM tests will skip"; \
		exit 0; \
	fi; \
	policy=/usr/sbin/policy-rc.d; \
	if [ ! -e $$policy ]; then \
		printf '#!/bin/sh\nexit 101\n' > $$policy && chmod +x $$policy; \
		trap "rm -f $$policy" EXIT; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm \
		|| echo "slurm-wlm could not be installed: SLURM tests will skip"

test: install system-packages
	pytest

# the edit loop: everything but real trainings, sweeps and DVC runs (pytest -m slow: those)
test-fast: install
	pytest -m "not slow"

# Offline: the DVC pipeline on the real digits data (LeNet-5 x fc/gap/spp and LeCun 1998),
# a small parallel sweep grouped under one MLflow parent run, then the results table.
demo: install
	dvc repro --glob 'evaluate@digits-*'
	python -m pipeline.train -m experiment=digits model.head=fc,gap,spp trainer.max_epochs=15 \
		hydra/launcher=joblib hydra.launcher.n_jobs=2
	python -m pipeline.report

lint: install
	ruff check .
	ruff format --check .

format: install
	ruff check --fix .
	ruff format .

bench: install
	python -m benchmarks.bench

ui: install
	mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
