# Two commands on a fresh machine (see README):  make demo   |   make test
# Each creates the virtualenv, installs what is missing (Python packages, the Fashion-MNIST Debian package where
# apt-get is available) and then runs.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fedsim-installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup data demo test test-all clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Real Fashion-MNIST from Debian's package (no download at run time); skipped where it is there or no apt-get.
data:
	@if [ -f "$(FMNIST)" ] || [ -n "$$FEDSIM_DATA" ]; then echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST: no apt-get here; set FEDSIM_DATA or let torchvision download it (see README)"; fi

# The main job: every algorithm beside its baselines on real Fashion-MNIST (scenarios/demo-fmnist.toml): a
# federation part (AFL, FuseFL, one-shot FedAvg, FedAvg, centralized; Dirichlet(0.1) over 5 clients) and a continual
# part (AEF-OCL with online SGD / joint ridge, DPCR with finetune / joint); one table per part, plots in runs/demo.
# Over seeds with mean, std and 95% intervals: make demo DEMO_ARGS="--seeds 3" (about three times as long).
DEMO_ARGS ?=
demo: setup data
	$(VENV)/bin/fedsim run scenarios/demo-fmnist.toml --out runs/demo $(DEMO_ARGS)

# The test command CI runs (.ci/run): the representative suite (slow-marked tests excluded unless FEDSIM_ALL=1).
test: setup data
	$(PY) -m pytest $(if $(FEDSIM_ALL),,-m "not slow") $(PYTEST_ARGS)

test-all: setup data
	$(PY) -m pytest $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
