# The two commands: `make run` and `make test`. Both create .venv and install on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Demo settings for `make run` only: loopback, a demo app id and a demo token.
DEMO_SDKAPPID ?= 1400000000
DEMO_TOKEN ?= demo-token-not-for-production

.PHONY: run test test-fast install lint bench bench-queries clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	@$(BIN)/topic-audit migrate
	@echo
	@echo "!! DEMO MODE: SdkAppid $(DEMO_SDKAPPID) and a demo token, loopback only. Not for production. !!"
	@echo
	@echo "Receiver:  http://127.0.0.1:8000/callback   Datasette: http://127.0.0.1:8001/audit"
	@echo "Forwarding every callback to a demo app handler on http://127.0.0.1:8002 (topic-audit sink: its lines start with 'sink:')"
	@echo "Send a first signed callback from another terminal:"
	@echo
	@echo "    TOPIC_AUDIT_SDKAPPID=$(DEMO_SDKAPPID) TOPIC_AUDIT_TOKEN=$(DEMO_TOKEN) $(BIN)/topic-audit send"
	@echo
	@TOPIC_AUDIT_SDKAPPID=$(DEMO_SDKAPPID) TOPIC_AUDIT_TOKEN=$(DEMO_TOKEN) \
	  TOPIC_AUDIT_HOST=127.0.0.1 TOPIC_AUDIT_EXPLORE_HOST=127.0.0.1 \
	  TOPIC_AUDIT_FORWARD_URL=http://127.0.0.1:8002/callback \
	  sh -c '$(BIN)/topic-audit explore & explore=$$!; $(BIN)/topic-audit sink & sink=$$!; \
	         trap "kill $$explore $$sink 2>/dev/null" EXIT INT TERM; \
	         $(BIN)/topic-audit serve'

test: $(STAMP)
	$(BIN)/pytest

# The inner loop: every test but those marked slow (a few minutes here; `make test` runs them all).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

# The benchmark suite (not part of `make test`; takes a while): prints the tables quoted in docs/performance.md.
bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.bench

# Cluster mode (1 receiver + 1 writer + 3 nats-server) against one serve, same run (needs wrk; nats-server from the venv).
.PHONY: bench-cluster
bench-cluster: $(STAMP)
	$(BIN)/python -m tests.benchmarks.bench_cluster

# Datasette query times on a generated 1,000,000-entry log.
bench-queries: $(STAMP)
	test -f data/bench-1m.db || $(BIN)/python -m tests.benchmarks.logs data/bench-1m.db 1000000 30
	$(BIN)/python -m tests.benchmarks.bench_queries data/bench-1m.db

lint: $(STAMP)
	$(BIN)/ruff check service tests dashboard grafana
	$(BIN)/ruff format --check service tests dashboard grafana
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	@# The docs, strictly (a broken link or anchor fails); not --quiet, which hides the warnings --strict counts.
	site=$$(mktemp -d); $(BIN)/mkdocs build --strict --site-dir "$$site"; status=$$?; rm -rf "$$site"; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
