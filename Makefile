# Two commands on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

# torch first (kept if one is already there, e.g. a CUDA build), then fairseq-fixed
# compiled against it without build isolation (an isolated build would fetch another
# torch), then this package, then fastBPE (Cython, no build isolation).
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q cython "numpy>=1.21.3"
	$(BIN)/python -m pip install -q --no-build-isolation "fairseq-fixed==0.12.3.1"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-build-isolation "fastBPE==0.1.0"
	$(BIN)/python -c "import fairseq, elmer_fairseq, fastBPE; print('installed: fairseq', fairseq.__version__)"
	touch $(STAMP)

demo: install
	bash scripts/demo.sh

# one test file per worker process, one CPU core each (one torch thread each: two torch processes
# with a thread per core each spin against each other); the 20 slowest tests are listed at the end
TEST_JOBS ?= auto
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=20 tests

clean:
	rm -rf checkpoints data-bin/sample data-bin/sample.spm
