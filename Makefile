# megamoe: `make train` runs the main job, `make test` the test suite; both install first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

ifeq ($(HAS_CUDA),1)
  # GPU hosts (NGC images): reuse the image's CUDA torch; faiss-gpu instead of faiss-cpu.
  VENV_FLAGS ?= --system-site-packages
  EXTRAS ?= dev,gpu,hf,eval
  TORCH_PIN ?=
  CONSTRAINTS ?=
else
  VENV_FLAGS ?=
  EXTRAS ?= dev,cpu,hf,eval
  TORCH_PIN ?= torch==2.13.0
  CONSTRAINTS ?= -c constraints/cpu.txt
endif

STAMP := $(VENV)/.megamoe-installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install train test test-isa lint bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints/cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_PIN),$(PIP) $(TORCH_PIN))
	$(PIP) $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@touch $@

# The main job: a tiny Lory model (8 experts, 64-token segments) on similarity-ordered documents.
# MAIN= (empty) trains the dense default instead; ARGS adds key=value overrides.
MAIN ?= configs/main_lory.yaml
train: install
	$(VENV)/bin/megamoe train $(MAIN) $(ARGS)

# pytest exits 5 when it collects nothing: that is a failure too (make exits non-zero on any rc).
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

# The suite under the other CPU kernel families this machine can select (AVX2, AVX-512 without AMX,
# SSE4.2): CI machines differ in CPU and fp32 results depend on the kernels (docs/reliability.md).
test-isa: install
	tools/test_isa.sh $(FAMILIES) -- $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@$(PY) tools/size_report.py

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/parallel_throughput.py
	$(PY) bench/moe_block.py
	$(PY) -m bench.router_overhead
	$(PY) -m bench.lory_layer
	$(PY) -m bench.similarity_order
	$(PY) -m bench.pipeline_bubble
	$(PY) -m bench.recompute

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache
