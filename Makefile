# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# uv installs the ~150 packages in ~50 s where pip takes ~3 min. It reads no pip configuration, so it gets
# pip's find-links (where this project's CPU machines keep the torch wheel constraints.txt pins) from
# the environment or pip's config files. --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE
# is set (these machines), every process would otherwise compile torch and transformers again (20 s of
# imports instead of 9).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))

.PHONY: install demo test clean corpus acft

$(STAMP): pyproject.toml constraints.txt overrides.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt --override overrides.txt $(foreach d,$(FIND_LINKS),--find-links $(d)) \
	  -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/whisper-lora demo

# One pytest-xdist worker per core (at most 4), one compute thread each (tests/conftest.py): on two cores
# the suite's tests take ~12.5-14 min (13m54s on an AMD EPYC without AVX-512) instead of ~21.5 as one process. `pytest` alone runs in one process, for one file.
test: install
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist worksteal

# The ready short-context adapter for the embedded whisper-base (configs/acft-base.yaml, ~20 min on two
# cores), then its table of encoder contexts beside the base model's (bench/context_bench.py).
acft: install
	$(BIN)/whisper-lora train --config configs/acft-base.yaml --overwrite
	$(BIN)/python bench/context_bench.py --model runs/acft-base/adapter --out bench/results/context_vm_acft.json

# Regenerate the committed Mandarin demo corpus (needs espeak-ng from apt).
corpus: install
	command -v espeak-ng >/dev/null || (apt-get update -q && apt-get install -y -q espeak-ng)
	$(BIN)/python -m pip install -q -e ".[demo]"
	$(BIN)/python demo/make_corpus.py

clean:
	rm -rf $(VENV) demo-output runs
