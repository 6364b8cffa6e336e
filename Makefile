# One virtual environment per checkout; torch is installed first from the pinned CPU wheel
# (override with `make test TORCH_SPEC='torch>=2.0'`), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,mlm,lm,lightning
OUT ?= pyro-mpt-out
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench docs reproduce clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/pyro-mpt demo --out $(OUT)

lint: venv
	$(BIN)/ruff check .

# Two pytest workers with one thread each: more threads than cores makes torch's batched
# factorisations spin (measured 10x slower).
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m benchmarks

# The docs extra (sphinx, myst-nb, furo, jupytext, ipykernel, MathJax) is installed on first use, so
# that `make test` never needs it. Tutorials are executed during the build (cached in docs/_build),
# single-threaded like the tests: their small batched kernels only slow down with more threads.
docs: venv
	$(BIN)/python -c "import sphinx, myst_nb, furo, jupytext, ipykernel; \
		__import__('sphinx-mathjax-offline')" 2>/dev/null \
		|| $(BIN)/pip install -q -e ".[docs]"
	OMP_NUM_THREADS=1 $(BIN)/sphinx-build -E -W --keep-going -b html docs docs/_build/html

reproduce: venv
	$(BIN)/pyro-mpt reproduce all --out $(OUT)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache *.egg-info
