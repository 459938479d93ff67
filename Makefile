# mmflow: every set-up step lives here; README and CI call these targets exactly.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

# Parameters of `make reproduce` (defaults: the embedded model and data, offline).
MODEL  ?= shapes-llava
DATA   ?= shapes
IMAGES ?=
DEVICE ?= cpu
DTYPE  ?= float32
N      ?= 0
OUT    ?= figures
NOTEBOOKS := 1_to_last_flow 2_image_to_question 3_patch_groups 4_answer_casing 5_overview
EXECUTED  := notebooks/executed

.PHONY: venv test reproduce bench toy-model toy-eval clean
venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "mmflow needs $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11 ...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name mmflow --display-name "mmflow" >/dev/null
	@rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

reproduce: $(STAMP)
	@mkdir -p $(EXECUTED) $(OUT)
	@set -e; for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(PY) -m papermill --kernel mmflow --progress-bar --cwd notebooks notebooks/$$nb.ipynb $(EXECUTED)/$$nb.ipynb \
	    -p model "$(MODEL)" -p data "$(DATA)" -p images "$(IMAGES)" -p device "$(DEVICE)" -p dtype "$(DTYPE)" \
	    -p n_per_task $(N) -p out_dir "$(abspath $(OUT))" \
	    || { echo "make reproduce: notebook $$nb failed (see the cell named above; executed copy in $(EXECUTED)/$$nb.ipynb)"; exit 1; }; \
	done

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench.py

toy-model: $(STAMP)
	$(PY) -m shapes_world.train

toy-eval: $(STAMP)
	$(PY) -m shapes_world.evaluate

clean:
	rm -rf $(EXECUTED) results
