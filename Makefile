# One command each: `make demo` (set up + build the sample dataset), `make test`, `make lint`, `make ui`.
SHELL := /bin/bash
VENV ?= .venv
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
# The same defaults the activated venv has (scripts/attrface_env.sh): bare `dagster job execute -j <job>` works.
ATTRFACE_ENV := . scripts/attrface_env.sh &&

.PHONY: help setup setup-vllm demo train-a2bfr train-roboface lint test test-fast ui bench bench-verbalize bench-flowedit bench-publish bench-loader bench-degradation bench-a2bfr bench-eval evaluate review clean postgres postgres-stop

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-18s %s\n", $$1, $$2}'

setup:  ## create .venv with everything the offline profile and the tests need (registries only)
	bash scripts/setup.sh

setup-vllm:  ## the separate vLLM-on-CPU venv (.venv-vllm) for the vllm verbalizer tests
	bash scripts/setup_vllm.sh

demo: setup  ## set up, build the sample dataset, print what was built and the next commands
	$(ATTRFACE_ENV) $(VENV)/bin/attrface demo

train-a2bfr:  ## train A²BFR on the published shards (Dagster job train_a2bfr)
	$(ATTRFACE_ENV) $(VENV)/bin/attrface job train_a2bfr

evaluate:  ## benchmark sets and the evaluation report (Dagster job evaluate)
	$(ATTRFACE_ENV) $(VENV)/bin/attrface job evaluate

train-roboface:  ## train RoboFace (captions, stage I, stage II)
	$(ATTRFACE_ENV) $(VENV)/bin/attrface job train_roboface

lint:  ## ruff
	$(VENV)/bin/ruff check .

test:  ## the README's test command: unit + slow integration tests
	$(VENV)/bin/python -m pytest -q

test-fast:  ## the tests without the slow integration ones
	$(VENV)/bin/python -m pytest -q -m "not slow"

ui:  ## the Dagster UI over this project (dagster dev)
	$(ATTRFACE_ENV) $(VENV)/bin/dagster dev -w workspace.yaml

bench:  ## benchmark: face detection speed
	$(VENV)/bin/python benchmarks/detect_speed.py

bench-verbalize:  ## benchmark: prompt writing throughput
	$(VENV)/bin/python benchmarks/verbalize_throughput.py

bench-flowedit:  ## benchmark: FlowEdit speed (tiny on CPU)
	$(VENV)/bin/python benchmarks/flowedit_speed.py

bench-publish:  ## benchmark: shard publishing throughput
	$(VENV)/bin/python benchmarks/publish_throughput.py

bench-loader:  ## benchmark: training loader throughput
	$(VENV)/bin/python benchmarks/loader_throughput.py

bench-degradation:  ## benchmark: degradation speed
	$(VENV)/bin/python benchmarks/degradation_speed.py

bench-a2bfr:  ## benchmark: A²BFR train step and restore
	$(VENV)/bin/python benchmarks/a2bfr_speed.py

bench-eval:  ## benchmark: evaluation metrics and report
	$(VENV)/bin/python benchmarks/eval_metrics_speed.py --report

review:  ## the human-review web app over the QC'd pairs
	$(VENV)/bin/attrface review

# A local PostgreSQL for the Dagster instance (parallel runs, backfills): then `eval "$$(scripts/postgres.sh env)"`.
postgres:  ## a local PostgreSQL for parallel runs and backfills
	bash scripts/postgres.sh start

postgres-stop:  ## stop it
	bash scripts/postgres.sh stop

clean:  ## remove the build and the instance's run history
	rm -rf data/build dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
