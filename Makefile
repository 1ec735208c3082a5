# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-unit test-kafka chaos check-deploy lint demo bench bench-streams bench-outbox kafka clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sagaz needs Python >= 3.11, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: venv            ## the whole suite; starts a local Kafka broker unless KAFKA_BOOTSTRAP_SERVERS is set
	$(PY) -m pytest -q

test-unit: venv       ## the fast, service-free part
	$(PY) -m pytest -q tests/unit

test-kafka: venv
	$(PY) -m pytest -q -m kafka

chaos: venv           ## the chaos suite at its long sizes (~1 h); writes docs/chaos.md
	rm -rf var/chaos
	SAGAZ_CHAOS=long $(PY) -m pytest -q -s -m chaos tests/chaos; status=$$?; \
		$(PY) -m tests.chaos.report; exit $$status

check-deploy: venv   ## k8s/ rendered by kustomize and checked by kubeconform; docker/compose.yaml
	$(PY) -m pytest -q tests/unit/test_k8s_validate.py tests/unit/test_manifests.py \
		tests/unit/test_compose.py

lint: venv
	$(VENV)/bin/ruff check sagaz streams tests
	$(VENV)/bin/mypy sagaz streams

demo: venv            ## local broker, orchestrator + participant workers, 1,000 sample sagas
	$(PY) -m streams.demo

bench: venv           ## in-process engine against sagaz 1.5.0 (needs ../shared/peers)
	$(PY) tests/bench/bench_core.py --peer

bench-streams: venv   ## sagas/s and latency through Kafka
	$(PY) tests/bench/bench_streams.py

bench-outbox: venv    ## outbox and inbox on PostgreSQL, Redis, memory -> Kafka, vs sagaz 1.5.0
	$(PY) tests/bench/bench_outbox.py --peer

kafka: venv           ## a broker in the foreground, for development
	$(PY) -m sagaz.testing.kafka start --partitions 4

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis var
