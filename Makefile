# ringblob — build, run, test.
#
#   make run     set up everything, then start the daemon on its embedded defaults (./var)
#   make test    set up everything, then run the test suite
#   make bench   set up everything (plus fio/redis from apt), then run the benchmarks
#   make clean   remove build outputs (keeps ./var data)
#
# Set-up is idempotent: liburing-dev from apt when <liburing.h> is missing,
# a .venv with the package installed in place and the Cython engine built.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
EXT_STAMP := $(VENV)/.ext-built
EXT_SRC := $(wildcard cython/*.pyx cython/*.pxd) setup.py
LIBURING_H ?= /usr/include/liburing.h
PYTEST_ARGS ?=

.PHONY: all setup run test bench torture fuzz install clean liburing doctor

all: setup

liburing:
	@if [ ! -f "$(LIBURING_H)" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then \
	    echo "ringblob: $(LIBURING_H) is missing; installing Debian's liburing-dev with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q liburing-dev; \
	  else \
	    echo "ringblob: $(LIBURING_H) is missing and this is not root."; \
	    echo "Install it with:  sudo apt-get update && sudo apt-get install -y liburing-dev"; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml | liburing
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=68" wheel "Cython>=3.0"
	$(PIP) install -q --no-build-isolation -e '.[test,fast,bench]'
	@touch $(STAMP) $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) $(EXT_SRC)
	$(PY) setup.py -q build_ext --inplace
	@touch $(EXT_STAMP)

setup: liburing $(STAMP) $(EXT_STAMP)

run: setup
	$(VENV)/bin/ringblob serve

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/engine.py

doctor: setup
	$(VENV)/bin/ringblob doctor

clean:
	rm -rf build dist daemon/*.egg-info daemon/ringblob/_uring*.so daemon/ringblob/_uring.c cython/*.c .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f $(STAMP) $(EXT_STAMP)
