# mmflow: every set-up step lives here; README and CI call these targets exactly. `make` alone lists them.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

# Parameters of `make reproduce` (defaults: the embedded model and data, offline). Paths may be relative.
MODEL  ?= shapes-llava
# Notebook 6 compares these models (whitespace-separated names, hub ids or folders). Empty: both embedded models
# (shapes-llava, shapes-qwen) on the default run, else just MODEL.
MODELS ?=
DATA   ?= shapes
IMAGES ?=
DEVICE ?= cpu
DTYPE  ?= float32
N      ?=
OUT    ?= figures
CACHE  ?= results
INPUTS ?=
KEEP   ?=
# The knockout engine: fast (exact, reuses the clean run) or naive (one full forward per window; the families whose
# fast engine refuses, e.g. Gemma 3, need it). Empty: the notebooks' default, fast.
ENGINE ?=
# The fast engine's most suffix tokens per pass (default: what fits in a quarter of the device's free memory).
TOKEN_BUDGET ?=
# make reproduce runs this many notebooks side by side (the per-model analyses at once), each kernel on an even
# share of the CPU cores (unless OMP_NUM_THREADS is set); JOBS=1: one after another.
JOBS   ?= 2
# Extra flags for make bench (bench/bench.py --help), e.g. --wide: the models at their real widths, for a GPU.
BENCH_FLAGS ?=
# A trailing slash means the same folder (OUT=figures/ is OUT=figures: the committed executed copies); "/" stays "/"
# (and is refused by mmflow.execute before anything is written).
override OUT   := $(if $(filter-out /,$(OUT)),$(patsubst %/,%,$(patsubst %/,%,$(OUT))),$(OUT))
override CACHE := $(if $(filter-out /,$(CACHE)),$(patsubst %/,%,$(patsubst %/,%,$(CACHE))),$(CACHE))
ifneq ($(TOKEN_BUDGET),)
export MMFLOW_TOKEN_BUDGET := $(TOKEN_BUDGET)
endif

# Executed copies: the default run's are committed documents (notebooks/executed); other runs keep theirs by OUT.
EXECUTED  ?= $(if $(filter figures,$(OUT)),notebooks/executed,$(OUT)/executed)
SOURCES   := $(sort $(wildcard notebooks/[0-9]*_*.ipynb))
RUNS      := $(patsubst notebooks/%,$(EXECUTED)/%,$(SOURCES))
OVERVIEW  := $(filter %_overview.ipynb,$(RUNS))
ACROSS    := $(filter %_across_models.ipynb,$(RUNS))
ANALYSES  := $(filter-out $(OVERVIEW) $(ACROSS),$(RUNS))

.DEFAULT_GOAL := help
.PHONY: help venv runs across-cache test test-browser lint format lab reproduce sweep report check-data families bench toy-model toy-eval clean FORCE

help: ## list the targets
	@echo "mmflow: make TARGET [MODEL=... DATA=... IMAGES=... DEVICE=... DTYPE=... N=... OUT=... INPUTS=... KEEP=... ENGINE=... TOKEN_BUDGET=...]"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

venv: $(STAMP) ## create or refresh .venv from requirements.lock

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "mmflow needs $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11 ...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name mmflow --display-name "mmflow" >/dev/null
	@rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP) lint ## lint, doctests, the test suite, and nbval on the committed executed notebooks
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --doctest-modules mmflow tests
	HF_HUB_OFFLINE=1 MMFLOW_PROGRESS=/dev/null $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval-sanitize.cfg \
	  notebooks/executed

test-browser: $(STAMP) ## JupyterLab in headless Chromium: runs notebooks 1, 3, 4 and moves their widgets
	@command -v chromium >/dev/null || { echo "installing Debian's chromium (root needed)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q browser_tests

lint: $(STAMP) ## ruff on the code and the notebooks
	$(VENV)/bin/ruff check .

format: $(STAMP) ## ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .

PORT ?= 8888
lab: $(STAMP) ## JupyterLab on the notebooks (127.0.0.1, the mmflow kernel, widgets); open the URL it prints
	$(PY) -m mmflow.lab --port $(PORT)

reproduce: $(STAMP) ## run every notebook headlessly (JOBS at a time) -> OUT/*.png|pdf|csv, executed copies in notebooks/executed/
	@$(PY) -m mmflow.params --target reproduce --model "$(MODEL)" --models "$(MODELS)" --device "$(DEVICE)" \
	  --dtype "$(DTYPE)" --n "$(N)" --out-dir "$(OUT)" --cache-dir "$(CACHE)" --inputs "$(INPUTS)" --keep "$(KEEP)" \
	  --engine "$(ENGINE)" --jobs "$(JOBS)"
	@MMFLOW_JOBS="$(JOBS)" $(MAKE) --no-print-directory -j"$(JOBS)" runs

runs: $(if $(ACROSS),across-cache) $(RUNS) # every executed copy (what make reproduce runs, JOBS at a time)

# Notebook 6's other models (not MODEL), computed into CACHE beside notebooks 1-4 so that notebook 6 only reads them.
across-cache: $(STAMP)
	@$(PY) -m mmflow.warm $(patsubst $(EXECUTED)/%,notebooks/%,$(ACROSS)) --model "$(MODEL)" --models "$(MODELS)" \
	  --data "$(DATA)" --images "$(IMAGES)" --device "$(DEVICE)" --dtype "$(DTYPE)" --n "$(N)" --cache-dir "$(CACHE)" \
	  --inputs "$(INPUTS)" --keep "$(KEEP)" --engine "$(ENGINE)"

$(EXECUTED)/%.ipynb: notebooks/%.ipynb $(STAMP) FORCE
	@$(PY) -m mmflow.execute $< $@ --model "$(MODEL)" --models "$(MODELS)" --data "$(DATA)" --images "$(IMAGES)" --device "$(DEVICE)" \
	  --dtype "$(DTYPE)" --n "$(N)" --out-dir "$(OUT)" --cache-dir "$(CACHE)" --inputs "$(INPUTS)" --keep "$(KEEP)" \
	  --engine "$(ENGINE)"

$(OVERVIEW): $(ANALYSES) # the overview reads the figures' CSVs the analyses write
$(ACROSS): $(ANALYSES) $(if $(filter runs,$(MAKECMDGOALS)),across-cache) # it reads their cached analyses

NPROC ?= 2
sweep: $(STAMP) ## every analysis the notebooks need, split across NPROC processes (Accelerate; NPROC=1: one), into CACHE
	@$(PY) -m mmflow.params --target sweep --model "$(MODEL)" --dtype "$(DTYPE)" --n "$(N)" --cache-dir "$(CACHE)" \
	  --inputs "$(INPUTS)" --keep "$(KEEP)" --engine "$(ENGINE)"
	$(VENV)/bin/accelerate launch $(if $(filter 1,$(NPROC)),,--multi_gpu) --num_processes $(NPROC) --num_machines 1 --mixed_precision no \
	  --dynamo_backend no -m mmflow.sweep --model "$(MODEL)" --data "$(DATA)" --images "$(IMAGES)" --n "$(N)" \
	  --dtype "$(DTYPE)" --cache-dir "$(CACHE)" --inputs "$(INPUTS)" --keep "$(KEEP)" --engine "$(ENGINE)"

REPORT ?= results/report
report: $(STAMP) ## HTML report of the executed notebooks as they are (runs nothing; make reproduce first) -> REPORT/index.html
	$(PY) -m mmflow.report $(EXECUTED) "$(REPORT)"

check-data: $(STAMP) ## check DATA + IMAGES against MODEL's config and processor (no weights) before a long run
	$(PY) -m mmflow.check_data --model "$(MODEL)" --data "$(DATA)" --images "$(IMAGES)" --n "$(N)" --inputs "$(INPUTS)"

families: $(STAMP) ## every model family live on a tiny replica: loads, groups, patch geometry, engines vs oracle, lens
	HF_HUB_OFFLINE=1 $(PY) -m mmflow.families_check

bench: $(STAMP) ## the knockout engines side by side (speed, memory, agreement); DEVICE=cuda: on a GPU, fp32 and fp16; BENCH_FLAGS=--wide: real widths
	HF_HUB_OFFLINE=1 $(PY) bench/bench.py --device "$(DEVICE)" $(BENCH_FLAGS)

toy-model: $(STAMP) ## retrain an embedded model: MODEL=shapes-llava (default) or shapes-qwen (resumable)
	$(PY) -m shapes_world.train --model "$(MODEL)"

toy-eval: $(STAMP) ## held-out and blank-image accuracy of both embedded models (fresh seeds)
	$(PY) -m shapes_world.evaluate

clean: ## remove the results cache (figures, executed runs and reports written there too)
	rm -rf results

FORCE:
