# dolfinx_pinn: set-up, demo, tests, lint and benchmarks.
#
#   make demo                 create/refresh .venv, run the reference and main demos (out_<demo>/)
#   make test                 the same set-up, then the suite serially and under mpirun -n 2
#   make lint | bench | clean
#
# Variables:
#   PYTHON=/path/to/python3.12   interpreter for .venv (default: the first python3.12/python3.13
#                                that runs, on PATH or under pyenv)
#   DOLFINX=system               use an existing DOLFINx 0.11 (Docker image, conda, ...) through a
#                                --system-site-packages venv instead of the dolfinx-solver-real wheel
#   NP=2                         ranks of the parallel test run

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
DOLFINX ?= wheel
NP ?= 2
MAIN_DEMO ?= demos/demo_upscaling_consistency_1d.py
PY := $(VENV)/bin/python

ifeq ($(DOLFINX),system)
EXTRAS := test
VENV_FLAGS := --system-site-packages
else ifeq ($(DOLFINX),wheel)
EXTRAS := fenics,test
VENV_FLAGS :=
else
$(error DOLFINX must be 'wheel' (default) or 'system', got '$(DOLFINX)')
endif
STAMP := $(VENV)/.dolfinx_pinn-installed-$(DOLFINX)

# DOLFINX=system: the venv also sees the site-packages of the interpreter that created it (a .pth
# file), so a DOLFINx installed in a venv or conda environment, not only system-wide, is found.
# A venv whose interpreter no longer runs or is older than 3.12 is stale: drop its stamp so that
# the set-up below recreates it.
VENV_OK := $(shell $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && echo yes)
ifneq ($(VENV_OK),yes)
$(shell rm -f $(STAMP))
endif

# The first candidate that actually runs and is >= 3.12 (a pyenv shim on PATH may refuse to run).
define find_python
for candidate in "$(PYTHON)" python3.12 python3.13 \
    "$$(pyenv root 2>/dev/null || echo "$$HOME/.pyenv")"/versions/3.1[23]*/bin/python3.1[23]; do \
  [ -n "$$candidate" ] || continue; \
  if "$$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then \
    echo "$$candidate"; break; \
  fi; \
done
endef

.PHONY: help install demo test test-serial test-parallel lint bench clean

help:
	@sed -n '2,13p' Makefile | sed 's/^# \{0,1\}//'

$(STAMP): pyproject.toml
	@if ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 \
	    || ls $(VENV)/.dolfinx_pinn-installed-* 2>/dev/null | grep -qv -- '-$(DOLFINX)$$'; then \
	  python="$$($(find_python))"; \
	  if [ -z "$$python" ]; then \
	    echo "error: no Python >= 3.12 found (tried PYTHON, python3.13, python3.12, pyenv);" \
	      "install one or pass PYTHON=/path/to/python3.12" >&2; \
	    exit 1; \
	  fi; \
	  echo "creating $(VENV) with $$python ($(DOLFINX) DOLFINx)"; \
	  rm -rf $(VENV); \
	  "$$python" -m venv $(VENV_FLAGS) $(VENV); \
	  if [ "$(DOLFINX)" = system ]; then \
	    "$$python" -c 'import site; print("\n".join(site.getsitepackages()))' \
	      > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_dolfinx_pinn_system.pth"; \
	  fi; \
	fi
	@if [ "$(DOLFINX)" = system ] && ! $(PY) -c 'from mpi4py import MPI; import dolfinx' >/dev/null 2>&1; then \
	  echo "error: DOLFINX=system, but $(VENV) sees no DOLFINx; pass PYTHON= the interpreter that" \
	    "imports dolfinx (e.g. PYTHON=python3 in the DOLFINx image), or drop DOLFINX=system" >&2; \
	  exit 1; \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@$(PY) -c 'from mpi4py import MPI; import sys, dolfinx, torch; print("dolfinx", dolfinx.__version__, "torch", torch.__version__, "python", sys.version.split()[0])'
	@touch $@

install: $(STAMP)

# The fine-scale references first (seconds), then the main demo: the 1D hybrid solver.
demo: $(STAMP)
	$(PY) demos/demo_reference.py
	$(PY) $(MAIN_DEMO)

test: test-serial test-parallel

test-serial: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider tests

# mpi4py's -m runner aborts every rank when one fails instead of leaving the others hanging.
test-parallel: $(STAMP)
	mpirun="$$(command -v $(VENV)/bin/mpirun || command -v mpirun)"; \
	OMP_NUM_THREADS=1 "$$mpirun" -n $(NP) $(PY) -m mpi4py -m pytest -p no:cacheprovider -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check dolfinx_pinn tests demos benchmarks
	$(VENV)/bin/ruff format --check dolfinx_pinn tests demos benchmarks

# BENCH_ARGS="--quick" for the < 10 minute version; see benchmarks/run.py --help.
bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf out_*/ .pytest_cache
