# One-command workflows.  Each target creates .venv and installs the project first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Parallel test workers (pytest-xdist); CI machines have 2 cores.
WORKERS ?= 2

.PHONY: test test-quick test-min finetune finetune-t5 clean

# $(call install,VENV_DIR,PIP_OPTIONS): a venv with the project and its test extra.
define install
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2) -e ".[test]"
	touch $(1)/.installed
endef

# $(call suite,VENV_DIR): the whole suite.  pytest's exit code 5 ("no tests collected") is a
# failure here, not a pass: a suite that collects nothing means a broken checkout or a bad filter.
define suite
	@OPENBLAS_NUM_THREADS=1 $(1)/bin/python -m pytest -n $(WORKERS) -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc
endef

$(BIN)/.installed: pyproject.toml
	$(call install,$(VENV),)

## The main job: BOFT-finetune the bundled ViT (digits 0-4) to new classes (digits 5-9), on CPU.
finetune: $(BIN)/.installed
	$(BIN)/python -m train.finetune --output runs/vit-digits --overwrite

## The same for the bundled byte-level T5 on a new text task.
finetune-t5: $(BIN)/.installed
	$(BIN)/python -m train.finetune --model t5 --output runs/t5-bytes --overwrite

## Full test suite (what CI runs).
test: $(BIN)/.installed
	$(call suite,$(VENV))

## Quick subset: everything but the slow end-to-end tests.
test-quick: $(BIN)/.installed
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) -q -m "not slow"

## The whole suite under the oldest supported versions (constraints-min.txt: pyproject's lower
## bounds, pinned), in its own .venv-min.  Not part of CI; run it when a lower bound changes.
test-min: .venv-min/.installed
	$(call suite,.venv-min)

.venv-min/.installed: pyproject.toml constraints-min.txt
	$(call install,.venv-min,-c constraints-min.txt)

clean:
	rm -rf $(VENV) .venv-min .pytest_cache .hypothesis
