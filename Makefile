# One-command workflows.  Each target creates .venv and installs the project first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Parallel test workers (pytest-xdist); CI machines have 2 cores.
WORKERS ?= 2

.PHONY: test test-quick test-min finetune finetune-t5 clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

## The main job: BOFT-finetune the bundled ViT (digits 0-4) to new classes (digits 5-9), on CPU.
finetune: $(BIN)/.installed
	$(BIN)/python -m train.finetune --output runs/vit-digits --overwrite

## The same for the bundled byte-level T5 on a new text task.
finetune-t5: $(BIN)/.installed
	$(BIN)/python -m train.finetune --model t5 --output runs/t5-bytes --overwrite

## Full test suite (what CI runs).
## pytest's exit code 5 ("no tests collected") is a failure here, not a pass: a suite that
## collects nothing means a broken checkout or a bad filter.
test: $(BIN)/.installed
	@OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

## Quick subset: everything but the slow end-to-end tests.
test-quick: $(BIN)/.installed
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) -q -m "not slow"

## The whole suite under the oldest supported versions (constraints-min.txt: pyproject's lower
## bounds, pinned), in its own .venv-min.  Not part of CI; run it when a lower bound changes.
test-min: .venv-min/.installed
	@OPENBLAS_NUM_THREADS=1 .venv-min/bin/python -m pytest -n $(WORKERS) -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

.venv-min/.installed: pyproject.toml constraints-min.txt
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install -q --upgrade pip
	.venv-min/bin/python -m pip install -q -c constraints-min.txt -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) .venv-min .pytest_cache .hypothesis
