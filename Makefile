# The two commands: `make train` and `make test`. Both bootstrap .venv (Python >= 3.12, pinned deps) first.
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= dense_lm
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv interop train lint test test-gpu clean

venv:
	@bash scripts/bootstrap.sh

# .venv plus .venv-interop (Python 3.11 + torch CPU + transformers) for the Hugging Face interop tests
interop:
	@bash scripts/bootstrap.sh --interop

train: venv
	$(PY) -m recipes $(RECIPE) $(ARGS)

# ruff check with pyproject.toml's [tool.ruff] settings (line length 120); `make test` runs it before pytest
lint: venv
	$(VENV)/bin/ruff check .

test: interop lint
	AXL_TRITON_SITE="$${AXL_TRITON_SITE:-$(abspath $(VENV))/triton}" XLA_FLAGS="$${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" $(PY) -m pytest -q -n 2 --dist loadscope --timeout 600 --durations=12 $(PYTEST_ARGS)

test-gpu:
	python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests

clean:
	rm -rf runs/
