# Two entry points: `make demo` runs the workflow on the embedded synthetic zoo,
# `make test` runs the whole test suite. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test micro lint install clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	snakemake --profile workflow/profiles/default --cores $(CORES)

micro: $(STAMP)
	snakemake --profile workflow/profiles/default --cores $(CORES) --configfile config/micro.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	snakemake --lint
	snakefmt --check Snakefile workflow/rules

clean-results:
	rm -rf results resources logs .snakemake
