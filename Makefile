# Two entry points: `make demo` and `make test`. Each creates or reuses .venv and installs what
# it needs: torch==2.13.0 first (the CPU wheel), so that no loose range pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,adapters,bench,docs,gpu]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests
