# nextserve: two commands do everything on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install serve test test-fast clean redis-server proto

install: $(STAMP)

# torch is pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
# The installer is uv when the package registry has it (the same packages, several times faster: ~1.5 min
# instead of 2-5 on 2 cores), pip otherwise. uv does not read pip's configuration, so pip's find-links,
# index URLs and constraints (pip.conf, PIP_* variables: where a machine keeps its local wheels) are
# handed to it as UV_* variables (UV_PIP_ENV), and it weighs every index as pip does. uv compiles the
# packages' bytecode only when asked (pip always does): without it, where PYTHONDONTWRITEBYTECODE is set (as
# on the 2-core machine) every process compiles torch, transformers and Ray from source again, measured
# there: `import torch` 5.0 s of CPU instead of 1.7, transformers' qwen3_next 16.9 s instead of 5.5, in each
# of the suite's hundreds of processes (Ray workers, `up`, the CLI); compiling adds 15-25 s to the install.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if $(BIN)/pip install -q uv; then \
		eval "$$($(UV_PIP_ENV))"; export UV_INDEX_STRATEGY=unsafe-best-match; \
		$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python torch==$(TORCH_VERSION) && \
		$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]'; \
	else \
		$(BIN)/pip install -q torch==$(TORCH_VERSION) && $(BIN)/pip install -q -e '.[dev]'; \
	fi
	command -v redis-server >/dev/null || $(MAKE) redis-server
	touch $(STAMP)

# `export UV_FIND_LINKS='...'` etc., one line per setting pip has (`pip config list`: files and PIP_* variables).
UV_PIP_ENV = $(BIN)/pip config list 2>/dev/null | sed -n \
	-e "s/^[^.]*\.find-links=/export UV_FIND_LINKS=/p" -e "s/^[^.]*\.extra-index-url=/export UV_EXTRA_INDEX_URL=/p" \
	-e "s/^[^.]*\.index-url=/export UV_DEFAULT_INDEX=/p" -e "s/^[^.]*\.constraint=/export UV_CONSTRAINT=/p"

# `nextserve up` starts a local redis-server when no --redis-url is given; tests start real ones.
redis-server:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null

serve: install
	$(BIN)/nextserve up --model tiny

# Everything (tests/unit, process, grpc, cluster: what each tier starts is in pyproject.toml's markers), then
# the 25 slowest tests. test-fast: tests/unit only (no process, no server, no cluster), the one to run often.
# TEST_WORKERS pytest-xdist workers (tests/conftest.py's TierScheduling): the cluster tier is two chains of
# Ray clusters, one per worker, side by side; the other tiers go a module at a time to whichever worker is
# free; torch computes on one thread per test process, so two suit 2 cores (TEST_WORKERS=0 runs everything
# in one process, in file order).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests/unit

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
