# ringblob — build, run, test.
#
#   make run     set up everything, then start the daemon on its embedded defaults (./var)
#   make test    set up everything, then run the test suite
#   make bench   set up everything (plus fio/redis from apt), then run the benchmarks
#                (bench/run.py: ringblob vs fio vs Redis; make bench-quick: < 1 min)
#   make bench-engine   the engine alone vs fio (bench/engine.py)
#   make torture every reliability suite at full size, and the figures table
#   make fuzz    the atheris target over the protocol decoder (FUZZ_SECONDS)
#   make install the package, units, sysusers/tmpfiles and config (DESTDIR-aware)
#   make doctor  check this host (io_uring, O_DIRECT, memlock)
#   make clean   remove build outputs (keeps ./var data)
#
# Set-up is idempotent: liburing-dev from apt when <liburing.h> is missing,
# a .venv with the package installed in place and the Cython extensions (engine, index, allocator, journal encoders, engine adapter core, store GET and PUT paths) built.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
EXT_STAMP := $(VENV)/.ext-built
EXT_SRC := $(wildcard cython/*.pyx cython/*.pxd cython/*.h) setup.py
LIBURING_H ?= /usr/include/liburing.h
PYTEST_ARGS ?=

.PHONY: all setup run test test-deps bench bench-quick bench-deps bench-engine torture fuzz install clean liburing doctor

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

# The systemd unit tests use Debian's systemd tools (systemd-analyze,
# systemd-socket-activate); they are installed here when missing (as root)
# and the tests that need them skip with the package named otherwise.
test-deps:
	@if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$$(id -u)" -eq 0 ]; then \
	  echo "ringblob test: installing Debian's systemd tools with apt-get"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd; \
	fi

test: setup test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# fio and redis-server come from Debian's apt (root), else the command is printed;
# BENCH_ARGS e.g. "--medium --profile". bench-quick checks the harness in < 1 min.
BENCH_ARGS ?=

bench-deps:
	@missing=""; \
	for b in fio:fio redis-server:redis-server redis-benchmark:redis-tools; do \
	  command -v $${b%%:*} >/dev/null 2>&1 || missing="$$missing $${b#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then \
	    echo "ringblob bench: installing Debian's$$missing with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "ringblob bench:$$missing missing and this is not root; install with:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y$$missing"; \
	  fi; \
	fi
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PIP) install -q "matplotlib>=3.7"

bench: setup bench-deps
	$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: setup bench-deps
	$(PY) bench/run.py --quick $(BENCH_ARGS)

bench-engine: setup
	$(PY) bench/engine.py

torture: setup
	@$(PY) -c "import atheris" 2>/dev/null || $(PIP) install -q atheris
	$(PY) tests/torture.py

doctor: setup
	$(VENV)/bin/ringblob doctor

# coverage-guided fuzzing of the wire codec (atheris, installed into .venv when missing);
# prints a FIGURES line. FUZZ_SECONDS bounds the run.
FUZZ_SECONDS ?= 60

fuzz: setup
	@$(PY) -c "import atheris" 2>/dev/null || $(PIP) install -q atheris
	$(PY) tests/fuzz/fuzz_protocol.py --seconds $(FUZZ_SECONDS)

# -- make install (systemd service; see docs/OPERATIONS.md) ------------------
# Installs the package into its own venv under $(RINGBLOB_HOME) with a link
# $(PREFIX)/bin/ringblob, the units, sysusers.d/tmpfiles.d entries, the docs,
# and an example /etc/ringblob/ringblob.toml (never overwriting an existing one).
# DESTDIR=/some/dir stages everything there instead (nothing outside it is
# touched); without DESTDIR on a host booted with systemd it also creates the
# user, the directories, and reloads systemd. `make install-files` skips the venv.
DESTDIR       ?=
PREFIX        ?= /usr/local
RINGBLOB_HOME ?= /opt/ringblob
UNITDIR       ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR   ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR   ?= $(PREFIX)/lib/tmpfiles.d
CONFDIR       ?= /etc/ringblob
DOCDIR        ?= $(PREFIX)/share/doc/ringblob
INSTALL_EXTRAS ?= fast
# the service's interpreter: the system one (readable by the ringblob user), not a pyenv under /root
INSTALL_PYTHON ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,$(PYTHON))

.PHONY: install-venv install-files

install: liburing install-venv install-files
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemd-sysusers $(SYSUSERSDIR)/ringblob.conf && \
	  systemd-tmpfiles --create $(TMPFILESDIR)/ringblob.conf && \
	  systemctl daemon-reload; \
	fi
	@echo "ringblob: installed. Next: ringblob doctor --data /var/lib/ringblob/ringblob.data;" \
	  "systemctl enable --now ringblob.socket (docs/OPERATIONS.md)"

install-venv:
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(RINGBLOB_HOME)
	$(DESTDIR)$(RINGBLOB_HOME)/bin/pip install -q --upgrade pip
	$(DESTDIR)$(RINGBLOB_HOME)/bin/pip install -q '.[$(INSTALL_EXTRAS)]'
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlI -- '$(DESTDIR)$(RINGBLOB_HOME)' $(DESTDIR)$(RINGBLOB_HOME)/bin $(DESTDIR)$(RINGBLOB_HOME)/pyvenv.cfg \
	    | xargs -r sed -i 's#$(DESTDIR)$(RINGBLOB_HOME)#$(RINGBLOB_HOME)#g'; \
	fi

install-files:
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
	  $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(DOCDIR)
	ln -sfn $(RINGBLOB_HOME)/bin/ringblob $(DESTDIR)$(PREFIX)/bin/ringblob
	install -m 0644 systemd/ringblob.service systemd/ringblob.socket $(DESTDIR)$(UNITDIR)/
	sed -i 's#/usr/local/bin/ringblob#$(PREFIX)/bin/ringblob#; s#/etc/ringblob/#$(CONFDIR)/#; s#/usr/local/share/doc/ringblob/#$(DOCDIR)/#' \
	  $(DESTDIR)$(UNITDIR)/ringblob.service $(DESTDIR)$(UNITDIR)/ringblob.socket
	install -m 0644 systemd/ringblob.sysusers $(DESTDIR)$(SYSUSERSDIR)/ringblob.conf
	install -m 0644 systemd/ringblob.tmpfiles $(DESTDIR)$(TMPFILESDIR)/ringblob.conf
	install -m 0644 docs/OPERATIONS.md $(DESTDIR)$(DOCDIR)/
	@if [ -e $(DESTDIR)$(CONFDIR)/ringblob.toml ]; then \
	  echo "ringblob: keeping the existing $(DESTDIR)$(CONFDIR)/ringblob.toml"; \
	else \
	  install -m 0644 systemd/ringblob.toml $(DESTDIR)$(CONFDIR)/ringblob.toml; \
	fi

clean:
	rm -rf build dist daemon/*.egg-info daemon/ringblob/_*.so cython/*.c .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f $(STAMP) $(EXT_STAMP)
