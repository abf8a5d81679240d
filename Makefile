# Everything a fresh machine needs: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow check lint typecheck protos protos-check bench bench-quick fetch clean

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
