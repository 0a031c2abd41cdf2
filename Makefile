# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test clean corpus

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/whisper-lora demo

test: install
	$(BIN)/python -m pytest

# Regenerate the committed Mandarin demo corpus (needs espeak-ng from apt).
corpus: install
	command -v espeak-ng >/dev/null || (apt-get update -q && apt-get install -y -q espeak-ng)
	$(BIN)/python -m pip install -q -e ".[demo]"
	$(BIN)/python demo/make_corpus.py

clean:
	rm -rf $(VENV) demo-output runs
