# Two commands for a fresh machine:
#   make serve   set up and serve the default model (ViT-B-32, laion2b) with an embedded index
#   make test    set up and run the test suite (make test-fast: tests/unit only)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVE_ARGS ?=

# apt-get needs root: sudo when we are not
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve serve-random test test-fast lint protos clean browser-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.server-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.server-installed

serve: $(VENV)/.server-installed
	$(BIN)/clipsearch serve --data-dir data $(SERVE_ARGS)

# No network for weights? Try the API with random weights (search results are meaningless).
serve-random: $(VENV)/.server-installed
	$(BIN)/clipsearch serve --data-dir data --random-weights $(SERVE_ARGS)

test: $(VENV)/.dev-installed browser-deps
	$(BIN)/python -m pytest

# The quick loop: tests/unit starts no server process (under 3 minutes on 2 cores).
test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest tests/unit

# The browser tests drive Debian's chromium through chromium-driver: install them when missing.
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing chromium and chromium-driver for the browser tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$(SUDO) apt-get install -y -qq chromium chromium-driver; \
	fi

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	cd protos && ../$(BIN)/buf lint

protos: $(VENV)/.dev-installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=client --pyi_out=client \
		--grpc_python_out=client \
		--plugin=protoc-gen-connect-python=$(BIN)/protoc-gen-connect-python \
		--connect-python_out=client protos/clipsearch/v1/clipsearch.proto

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
