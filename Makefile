# Two commands on a fresh machine: `make demo` (the offline pipeline) and `make test`.
# Both create the virtual environment first when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
VENV := .venv
UV := .tools/bin/uv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install system-packages test test-fast demo lint format bench bench-search gpu-wheels \
	gpu-check ui server clean

install: $(VENV)/.installed

# uv installs the exact versions pinned in uv.lock (same environment today and next month).
$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra dev --python $(PYTHON)
	touch $@

# Debian's PostgreSQL (the tracking server's database), SLURM (slurm-wlm, for the tests'
# two-node cluster on loopback) and Chromium (the browser the UI test looks through), installed
# where this runs as root with apt-get, without
# starting the system's daemons (policy-rc.d); elsewhere, or if that fails, the tests that need
# them are skipped, saying why (with CI=true in the environment they fail instead).
system-packages:
	@missing=""; \
	command -v slurmctld >/dev/null 2>&1 || missing="$$missing slurm-wlm"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "not installed (needs root and apt-get):$$missing; their tests will skip"; \
		exit 0; \
	fi; \
	policy=/usr/sbin/policy-rc.d; \
	if [ ! -e $$policy ]; then \
		printf '#!/bin/sh\nexit 101\n' > $$policy && chmod +x $$policy; \
		trap "rm -f $$policy" EXIT; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q --no-install-recommends $$missing \
		|| echo "could not install$$missing: their tests will skip"

test: install system-packages
	pytest

# the edit loop: everything but real trainings, sweeps and DVC runs (pytest -m slow: those)
test-fast: install
	pytest -m "not slow"

# Offline: the DVC pipeline on the real digits data (LeNet-5 x fc/gap/spp and LeCun 1998),
# a small parallel sweep grouped under one MLflow parent run, then the results table.
# The trainings are small, so they share the cores as one-thread processes, all at once: two
# lanes of `dvc repro -s` (DVC unlocks the repository while a stage's command runs; -s: a lane
# leaves the shared upstream stages, done first, alone) take the digits runs in turn, beside
# the sweep's two trials at a time, which run niced: the lanes hold the longest chain (GAP's
# 150 epochs), the sweep fills the cores they leave idle, and both end together. Each writes
# to logs/.
demo: install
	dvc repro preprocess@digits
	@mkdir -p logs; export OMP_NUM_THREADS=1; \
	nice -n 10 python -m pipeline.train -m experiment=digits model.head=fc,gap,spp \
		trainer.max_epochs=15 hydra/launcher=joblib hydra.launcher.n_jobs=2 \
		> logs/sweep.log 2>&1 & sweep=$$!; \
	echo "training the digits runs (logs/digits-*.log) and the sweep (logs/sweep.log)"; \
	dvc stage list --name-only | sed -n 's/^train@\(digits-.*\)/\1/p' | xargs -P 2 -n 1 sh -c \
		'{ dvc --wait-for-lock repro -s "train@$$0" && dvc --wait-for-lock repro -s \
		"evaluate@$$0"; } > "logs/$$0.log" 2>&1 && echo "  done: $$0" \
		|| { tail -n 20 "logs/$$0.log"; exit 1; }'; lanes=$$?; \
	wait $$sweep || { tail -n 20 logs/sweep.log; exit 1; }; \
	grep -h "sweep best" logs/sweep.log | sed 's/^.*sweep best/  sweep best/'; \
	test $$lanes = 0
	python -m pipeline.report

lint: install
	ruff check .
	ruff format --check .

format: install
	ruff check --fix .
	ruff format .

# training speed (pipeline eager and compiled against a plain loop), then entry points' start-up
bench: install
	python -m benchmarks.bench
	python -m benchmarks.startup

# the digits search (24 trials x 30 epochs) without and with median pruning, side by side
bench-search: install
	python -m benchmarks.search

# The GPU path on a bare, offline GPU machine with its own torch (benchmarks/gpu_check.py):
# `make gpu-wheels` here saves what such a machine lacks into .whl/ (benchmarks/gpu_wheels.py);
# `make gpu-check` there installs those beside its torch, no virtual environment, and runs.
GPU_PYTHON ?= python3
GPU_SITE := /tmp/convnet-pipeline-gpu-site
gpu-wheels: | $(UV)
	.tools/bin/python -m benchmarks.gpu_wheels

gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install --quiet --no-index \
		--no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check $(ARGS)

# MLflow 3 opens in its GenAI view unless the address asks for the model-training one
ui: install
	@echo "open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the model-training view)"
	mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

# the team's tracking server (PostgreSQL + proxied artifacts): see README, "Scale out"
server: install system-packages
	python -m pipeline.server

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
