# One command each: `make demo` (set up + build the sample dataset), `make test`, `make lint`, `make ui`.
SHELL := /bin/bash
VENV ?= .venv
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
# The same defaults the activated venv has (scripts/attrface_env.sh): bare `dagster job execute -j <job>` works.
ATTRFACE_ENV := . scripts/attrface_env.sh &&

.PHONY: setup setup-vllm demo train-a2bfr train-roboface lint test test-fast ui bench bench-verbalize bench-flowedit bench-publish bench-loader bench-degradation bench-a2bfr bench-eval evaluate review clean postgres postgres-stop

setup:
	bash scripts/setup.sh

setup-vllm:
	bash scripts/setup_vllm.sh

demo: setup
	$(ATTRFACE_ENV) $(VENV)/bin/dagster job execute -j build_dataset

train-a2bfr:
	$(ATTRFACE_ENV) $(VENV)/bin/dagster job execute -j train_a2bfr

evaluate:
	$(ATTRFACE_ENV) $(VENV)/bin/dagster job execute -j evaluate

train-roboface:
	$(ATTRFACE_ENV) $(VENV)/bin/dagster job execute -j train_roboface

lint:
	$(VENV)/bin/ruff check .

test:
	$(VENV)/bin/python -m pytest -q

test-fast:
	$(VENV)/bin/python -m pytest -q -m "not slow"

ui:
	$(ATTRFACE_ENV) $(VENV)/bin/dagster dev -w workspace.yaml

bench:
	$(VENV)/bin/python benchmarks/detect_speed.py

bench-verbalize:
	$(VENV)/bin/python benchmarks/verbalize_throughput.py

bench-flowedit:
	$(VENV)/bin/python benchmarks/flowedit_speed.py

bench-publish:
	$(VENV)/bin/python benchmarks/publish_throughput.py

bench-loader:
	$(VENV)/bin/python benchmarks/loader_throughput.py

bench-degradation:
	$(VENV)/bin/python benchmarks/degradation_speed.py

bench-a2bfr:
	$(VENV)/bin/python benchmarks/a2bfr_speed.py

bench-eval:
	$(VENV)/bin/python benchmarks/eval_metrics_speed.py --report

review:
	$(VENV)/bin/attrface review

# A local PostgreSQL for the Dagster instance (parallel runs, backfills): then `eval "$$(scripts/postgres.sh env)"`.
postgres:
	bash scripts/postgres.sh start

postgres-stop:
	bash scripts/postgres.sh stop

clean:
	rm -rf data/build dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
