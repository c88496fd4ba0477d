# nextserve: two commands do everything on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install serve test test-fast clean redis-server proto

install: $(STAMP)

# torch is pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	command -v redis-server >/dev/null || $(MAKE) redis-server
	touch $(STAMP)

# `nextserve up` starts a local redis-server when no --redis-url is given; tests start real ones.
redis-server:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null

serve: install
	$(BIN)/nextserve up --model tiny

# Everything (tests/unit, process, grpc, cluster: what each tier starts is in pyproject.toml's markers), then
# the 25 slowest tests. test-fast: tests/unit only (no process, no server, no cluster), the one to run often.
test: install
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -q tests/unit

# The checked-in gRPC modules of proto/expert.proto, made as the package `nextserve.proto` imports them
# (tests/process/test_proto_generated.py fails, naming this target, when they are stale).
proto: install
	rm -rf build/proto && mkdir -p build/proto
	$(BIN)/python -m grpc_tools.protoc -Inextserve/proto=proto --python_out=build/proto --pyi_out=build/proto \
		--grpc_python_out=build/proto proto/expert.proto
	cp build/proto/nextserve/proto/expert_pb2.py build/proto/nextserve/proto/expert_pb2.pyi \
		build/proto/nextserve/proto/expert_pb2_grpc.py proto/

clean:
	rm -rf $(VENV) build *.egg-info
