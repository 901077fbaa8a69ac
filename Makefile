# optkit: `make bench` and `make test` install what is missing first.
#
# torch is never installed unpinned: a machine that already has torch (e.g. a CUDA build on a GPU
# machine) keeps it; one without gets $(TORCH_SPEC) (the CPU build on our CI machines). Elsewhere,
# pass the CPU wheel index yourself, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= test,quant
SUITE ?=
ARGS ?=
RUNS ?=
BASELINE ?=
CANDIDATE ?=
REGRESS_ARGS ?=
REPORT_ARGS ?=
# Two test processes when pytest-xdist is there (CI: 2 cores; 4m40s -> 3m30s), else one.
PYTEST_ARGS ?= $(shell $(PYTHON) -c "import xdist" 2>/dev/null && echo "-n 2")
# One install stamp per Python environment: a fresh virtual environment installs even where another
# environment's install already ran in this tree.
STAMP := .make/installed-$(shell $(PYTHON) -c "import sys; print(sys.prefix)" | cksum | cut -d' ' -f1)

.PHONY: install bench test test-gpu report regress list env clean-install

$(STAMP): pyproject.toml
	@mkdir -p .make
	@$(PYTHON) -c "import torch" 2>/dev/null \
	  && echo "keeping installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')" \
	  || $(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(PYTHON) -m optkit bench $(if $(SUITE),suite=$(SUITE)) $(ARGS)

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q --durations=10 $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

# RUNS=<run dirs>: report those (the newest run of each GPU kind and suite); without RUNS, re-render the
# committed reports from the runs reports/SOURCES names.
report: $(STAMP)
ifneq ($(strip $(RUNS)),)
	$(PYTHON) -m optkit report $(RUNS) $(REPORT_ARGS)
else
	@grep -v '^#' reports/SOURCES | while read -r out runs; do \
	  [ -n "$$out" ] || continue; \
	  $(PYTHON) -m optkit report $$runs --out $$out $(REPORT_ARGS) || exit 1; \
	done
endif

regress: $(STAMP)
	@test -n "$(BASELINE)" -a -n "$(CANDIDATE)" || { echo "usage: make regress BASELINE=results/<gpu>/<suite>/<run> CANDIDATE=<run dir>"; exit 2; }
	$(PYTHON) -m optkit regress --baseline $(BASELINE) --candidate $(CANDIDATE) $(REGRESS_ARGS)

list: $(STAMP)
	$(PYTHON) -m optkit list

env: $(STAMP)
	$(PYTHON) -m optkit env

clean-install:
	rm -rf .make
