# kiosk-operator: `make test` is the test command; `make demo` runs the whole pipeline locally.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml tests/pyproject.toml examples/custom-consumer/pyproject.toml requirements/lock.txt 2>/dev/null | sha1sum | cut -c1-12)
export KIOSK_CACHE ?= $(HOME)/.cache/kiosk-operator
PYTEST_ARGS ?=

.PHONY: test deps venv lint cluster-binaries images cluster-up cluster-down bench demo clean protos

test: deps venv cluster-binaries images lint
	$(PY) -m pytest $(PYTEST_ARGS)

deps:
	@missing=""; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v openssl >/dev/null || missing="$$missing openssl"; \
	  for p in containerd runc containernetworking-plugins iptables conntrack debootstrap buildah gcc libc6-dev; do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing (apt)"; \
	    SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	  fi
	@command -v go >/dev/null || { echo "error: Go is required to build the test cluster binaries"; exit 1; }

venv: $(STAMP)

# Every pin of requirements/lock.txt (hash-checked), then our own packages with no index, so an
# incomplete lock fails here instead of pulling an unpinned version.
$(STAMP): pyproject.toml tests/pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3
	$(PIP) install -q --require-hashes --no-deps -r requirements/lock.txt
	$(PIP) install -q --no-index --no-build-isolation -e '.[test]'
	$(PIP) install -q --no-index --no-build-isolation --no-deps -e tests  # the test harness (package harness)
	@if [ -f examples/custom-consumer/pyproject.toml ]; then $(PIP) install -q --no-index --no-build-isolation --no-deps -e examples/custom-consumer; fi
	$(PIP) check
	@rm -f $(VENV)/.installed-*; touch $@

lint: venv
	$(VENV)/bin/ruff check .

# Build logs go to stderr so that `eval "$$(make -s cluster-up)"` sees only the export line.
# The container images (python:3.11 slim stand-in, worker, operator) built with buildah, no
# registry; archives in $(KIOSK_CACHE)/images, cached by a hash of their inputs (seconds when
# warm). Needs root, buildah and debootstrap (deps). Progress on stderr.
images: deps venv
	$(PY) -m harness.images build base worker operator

cluster-binaries: venv
	bash tools/cluster/build.sh >&2
	$(PY) -m harness.storage_servers build >&2

cluster-up: venv cluster-binaries
	$(PY) tools/cluster/cluster.py up

cluster-down:
	$(PY) tools/cluster/cluster.py down

protos: venv
	bash tools/gen_protos.sh

bench: deps venv cluster-binaries
	bash tools/keda/build.sh  # KEDA for bench.bench_keda: built here only, never by `make test`
	$(PY) -m bench.run

demo:
	bash tools/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
