# Two entry points: `make demo` runs the workflow on the embedded synthetic zoo,
# `make test` runs the whole test suite. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test micro lint install clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The test extras (pytest, transformers, snakefmt) only where tests or lint run: the demo does
# not need them (about 30 s of a fresh clone's install).
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	snakemake --profile workflow/profiles/default --cores $(CORES)

micro: $(STAMP)
	snakemake --profile workflow/profiles/default --cores $(CORES) --configfile config/micro.yaml

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

lint: $(TEST_STAMP)
	snakemake --lint
	snakefmt --check Snakefile workflow/rules

clean-results:
	rm -rf results resources logs .snakemake
