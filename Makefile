# Everything a fresh machine needs: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow check lint typecheck protos protos-check bench bench-quick fetch clean compose-up compose-down test-compose

$(STAMP): pyproject.toml scripts/build_llamacpp.sh scripts/patch_ggml_invariant.py
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[server,openai,dev,bench]"
	bash scripts/build_llamacpp.sh $(VENV)
	bash scripts/deploy_tools.sh $(VENV)
	$(BIN)/python deploy/k8s/validate.py --install-kubectl
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/specdec demo

fetch: $(STAMP)
	$(BIN)/specdec models fetch qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -s

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy specdec_core specdec/config.py specdec/rpc.py specdec/convert.py specdec/placement.py specdec/security.py specdec/validate.py specdec/wire.py specdec/metrics.py specdec/logs.py drafter_service verifier_service client benchmarks

check: lint typecheck test

# Regenerate the committed stubs in specdec/v1 from protos/ (tests fail if they drift).
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

bench-quick: $(STAMP)
	$(BIN)/specdec bench --quick

bench: $(STAMP)
	$(BIN)/specdec bench

# The compose stack on this host's container engine (podman, or Docker where it runs): build the image, fill
# the models volume, start it and wait for health (gRPC :50051, OpenAI :8000); down keeps the models volume.
compose-up: $(STAMP)
	bash scripts/compose.sh up

compose-down:
	bash scripts/compose.sh down

# the stack brought up, used through its ports, its drafter killed and restarted, brought down (slow)
test-compose: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -s tests/test_compose_stack.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
