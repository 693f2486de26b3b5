# distdrgn: the two ways in are `make demo` and `make test`; both set up .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch; on a machine that already has a (GPU) torch in the
# venv nothing is reinstalled.
TORCH   ?= torch==2.13.0
DEMO    ?= demo_out

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# DeepSpeed (train.engine=deepspeed) is an sdist whose setup.py imports torch, so it is built
	# against the torch above without build isolation; DS_BUILD_OPS=0 compiles no CUDA ops (~10 s).
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m distdrgn.demo --out $(DEMO)

# the dashboard and report tests drive Debian's Chromium (installed here when apt-get can;
# otherwise those tests skip and say why)
test: install
	bash tests/setup/browser.sh
	bash tests/setup/slurm.sh
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
