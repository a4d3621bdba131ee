# `make demo` and `make test` work on a fresh machine: each creates .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip byte-compiles what it installs on one core; compileall does it on all of them (the same
# files, about 30 s less on two cores). A file no Python 3.11 compiles (torch ships one for 3.12)
# is skipped, as pip skips it.
COMPILE := $(BIN)/python -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --no-compile -e .
	$(COMPILE)
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --no-compile -e '.[dev]'
	$(COMPILE)
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/disco-cli demo --output demo-output

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-output build *.egg-info .pytest_cache
