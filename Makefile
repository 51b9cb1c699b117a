# Two commands set up a fresh machine: `make serve` and `make test` (README).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FASHION_DIR := /usr/share/datasets/fashion-mnist
export BENTOML_DO_NOT_TRACK := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup data browser test test-slow lint serve bento clean device-carry

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

# Debian ships the real Fashion-MNIST; install it when missing and possible (root, apt).
data:
	@if [ ! -d $(FASHION_DIR) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	     || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  else echo "note: $(FASHION_DIR) missing; run 'apt-get install dataset-fashion-mnist' as root"; fi; \
	fi

# Headless Chromium for the /ui browser test (tests/test_serving_ui.py skips without it).
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null)) \
	     || echo "warning: could not install chromium/chromium-driver; the /ui browser test will skip"; \
	  else echo "note: chromium/chromedriver missing; run 'apt-get install chromium chromium-driver' as root"; fi; \
	fi

test: setup browser
	$(BIN)/python -m pytest -q

# The slow suite also generates a client from the served OpenAPI document with
# openapi-python-client, in a venv of its own (it pins httpx<0.29, the project's venv has newer).
OAPC := .venv-oapc/bin/openapi-python-client
$(OAPC):
	$(PYTHON) -m venv .venv-oapc
	.venv-oapc/bin/pip install -q 'openapi-python-client==0.29.*'

test-slow: setup $(OAPC)
	PATH="$(CURDIR)/.venv-oapc/bin:$$PATH" $(BIN)/python -m pytest -q -m slow

# Serves the shipped default checkpoint (or CHECKPOINT=path) on 127.0.0.1:3000.
CHECKPOINT ?= default
HOST ?= 127.0.0.1
PORT ?= 3000
serve: setup
	$(BIN)/deqguard serve $(CHECKPOINT) --host $(HOST) --port $(PORT)

# A Bento for `bentoml containerize` (Docker needed for that step only); works offline.
# build/ goes too: setuptools never prunes it, so a module moved since the last build would ship twice.
# DEQGUARD_CHECKPOINT=name:version (`deqguard models push`) packs that stored model into the Bento
# and pins it as the Bento's `checkpoint` argument (README "Model store"); a path is not pinned.
bento: setup
	rm -rf dist build && $(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	$(BIN)/python -m bentoml build $(if $(findstring :,$(DEQGUARD_CHECKPOINT)),--arg checkpoint=$(DEQGUARD_CHECKPOINT))

# What `deqguard window` needs on a lent GPU machine (Python 3.12, torch, no network, none of the
# packages below, no Fashion-MNIST), in the two ignored folders the device call carries (README
# "One device window"). pyautoattack's wheel ships a 45 MB example model; it stays behind.
DEVICE_PACKAGES := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 pyautoattack==0.2.0
device-carry: setup data
	rm -rf .devsite .devdata
	$(BIN)/pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target .devsite \
	  $(DEVICE_PACKAGES)
	rm -rf .devsite/pyautoattack/examples .devsite/bin
	mkdir -p .devdata/fashion-mnist && cp $(FASHION_DIR)/*.gz .devdata/fashion-mnist/
	du -sh .devsite .devdata

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
