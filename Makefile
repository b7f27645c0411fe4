# dtm: every target bootstraps .venv itself; only python3 and make are needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/dtmpb/v1/*.proto)
DATA_DIR ?= .dtm-data
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help demo test test-fast lint proto check-proto up down status chaos chaos-soak chaos-fault-soak bench bench-soak bench-plot bench-participant certs clean

help:
	@echo "make demo        run the whole order flow end to end (starts and stops its own servers)"
	@echo "make test        run the test suite (includes short chaos and simulator runs)"
	@echo "make test-fast   the test suite without the slow real-process tests"
	@echo "make lint        ruff + mypy + generated-code drift check"
	@echo "make proto       regenerate generated/ from protos/"
	@echo "make up / down   start / stop coordinator and the four services in the background"
	@echo "make status      each process of the cluster (make up): pid, health, registered"
	@echo "make chaos       real-process crash matrix + random SIGKILLs (>= 200 runs)"
	@echo "make chaos-soak  the same, ten times longer (2000 runs, 10,000 simulator seeds)"
	@echo "make chaos-fault-soak  one 180 s run under load, a SIGKILL every 10 s (SOAK_S=...)"
	@echo "make bench       benchmark against same-run baselines (quick mode, ~30 s)"
	@echo "make bench-soak  3-minute run: coordinator memory and log size over 100,000+ transactions"
	@echo "make bench-plot  a small sweep over clients and participants, drawn to bench/results/"
	@echo "make bench-participant  a participant's CPU per branch on Exchange, in process (~15 s)"
	@echo "make certs       generate a local test CA and mTLS certificates into certs/"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,fast]'
	@touch $(STAMP)

venv: $(STAMP)

proto: $(STAMP)
	$(PY) -m dtm.tools.genproto --out generated

check-proto: $(STAMP)
	$(PY) -m dtm.tools.genproto --check generated

lint: $(STAMP) check-proto
	$(VENV)/bin/ruff check dtm participants tests bench examples
	$(VENV)/bin/ruff format --check dtm participants tests bench examples
	$(VENV)/bin/mypy

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m dtm.demo

up: $(STAMP)
	$(PY) -m dtm.cluster up --data-dir $(DATA_DIR)

down: $(STAMP)
	$(PY) -m dtm.cluster down --data-dir $(DATA_DIR)

status: $(STAMP)
	$(PY) -m dtm.cluster status --data-dir $(DATA_DIR)

chaos: $(STAMP)
	$(PY) -m dtm.chaos --runs $${CHAOS_RUNS:-200} --kill-runs $${CHAOS_KILL_RUNS:-100} --sim-seeds $${CHAOS_SIM_SEEDS:-500} \
		$${CHAOS_LATE_RUNS:+--late-runs $$CHAOS_LATE_RUNS}

chaos-soak: $(STAMP)
	$(PY) -m dtm.chaos --runs $${CHAOS_RUNS:-2000} --kill-runs $${CHAOS_KILL_RUNS:-1000} --sim-seeds 10000

# One long run under load with a SIGKILL every 10 s (design/reliability.md's fault soak).
chaos-fault-soak: $(STAMP)
	$(PY) -m dtm.chaos --runs 0 --kill-runs 0 --late-runs 0 --soak $${SOAK_S:-180}

bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

# The long run: is the coordinator's memory and log size flat over 100,000+ transactions?
# (About 3 minutes at 600-900 txn/s on 2 cores.) dtm only, no baselines; its results go to
# bench/results/soak/, so that latest.json stays a run with baselines.
bench-soak: $(STAMP)
	$(PY) -m bench.run --no-baselines --warmup 5 --duration $${SOAK_S:-180} \
		--results-dir bench/results/soak $(BENCH_ARGS)

# One participant's CPU per branch on the Exchange path, in process (no gRPC, no other
# process): BENCH_ARGS="--service orders --against DIR" compares with another checkout in
# interleaved pairs.
bench-participant: $(STAMP)
	$(PY) -m bench.participant_micro $(BENCH_ARGS)

bench-plot: $(STAMP)
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.plot

# A local test CA and a certificate per identity (development and tests only; certs/ is
# git-ignored). Then e.g.: python -m dtm.cluster up --tls-dir certs
certs: $(STAMP)
	$(PY) -m dtm.tools.certs --out certs

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache .mypy_cache .ruff_cache
