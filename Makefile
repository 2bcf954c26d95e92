# Two commands matter: `make demo` (the main job on the embedded default) and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 first (an unpinned torch pulls a
# multi-GB CUDA build), then the project, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LPIPS_VENV := .venv-lpips
LPIPS_STAMP := $(LPIPS_VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-unit demo demo-long bench clean lock

# constraints.txt: the exact tested versions of everything (setup.py only states compatible ranges).
$(STAMP): setup.py constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,serve,browser-tests]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) $(LPIPS_STAMP) chromium
	$(PY) -m pytest -q tests

# The parity test of `asymflow prep lpips` (tests/asymflow/test_lpips_prep.py) runs the lpips package itself, which
# imports torchvision; no torchvision loads beside .venv's CPU torch 2.13.0, so lpips gets a venv of its own with a
# matching torch/torchvision pair (tests/lpips_reference.txt: ~5.6 GB, ~1 min from the local wheel mirror). If it
# cannot be built this says so, and that test skips with the reason (under CI=true it fails instead).
$(LPIPS_STAMP): tests/lpips_reference.txt
	@rm -rf $(LPIPS_VENV) && $(PYTHON) -m venv $(LPIPS_VENV) && \
	  $(LPIPS_VENV)/bin/python -m pip install -q -r tests/lpips_reference.txt > $(LPIPS_VENV).log 2>&1 && \
	  touch $@ || { tail -n 5 $(LPIPS_VENV).log 2>/dev/null; \
	  echo "make: could not build $(LPIPS_VENV) from tests/lpips_reference.txt (log: $(LPIPS_VENV).log):" \
	       "the lpips parity test tests/asymflow/test_lpips_prep.py will be skipped"; }

# The browser test (tests/orchestration/test_serve_browser.py) drives the OS's Chromium through Playwright (whose own
# browser download cannot be fetched here): installed when missing; when the OS package cannot be installed (no root,
# no apt) this says so, and that test skips with the same reason.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "make: could not install the OS package chromium (apt-get install -y chromium needs root on Debian):" \
	       "the browser test tests/orchestration/test_serve_browser.py will be skipped"

test-unit: $(STAMP)
	$(PY) -m pytest -q tests -m "not integration"

demo: $(STAMP)
	$(PY) -m orchestration.demo --output demo-output

# Longer fine-tuning of the same demo (~30-60 min on 2 cores): does the pixel model beat the autoencoder's PSNR?
demo-long: $(STAMP)
	$(PY) -m orchestration.demo --long --output demo-long-output

bench: $(STAMP)
	$(PY) bench/run_all.py

# Record the current environment as the tested set (run after `make test` passes on an upgrade).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf demo-output demo-long-output .pytest_cache
