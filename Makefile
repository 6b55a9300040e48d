# `make demo` and `make test` each install what they need on a fresh Debian machine (as root):
# liburing-dev from apt when pkg-config cannot find liburing, a virtualenv, an editable build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
APT := DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: deps test demo bench bench-quick clean

deps: $(STAMP)

$(STAMP): pyproject.toml setup.py build_ffi.py uringsend/_uring.c uringsend/_uring.h
	@if ! pkg-config --exists liburing 2>/dev/null || ! command -v curl >/dev/null; then \
		$(APT) update -qq && $(APT) install -y -qq liburing-dev pkg-config curl; fi
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

test: deps
	$(PY) -m pytest -q -ra

demo: deps
	$(PY) -m uringsend demo

bench: deps
	$(PY) -m bench

bench-quick: deps
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info uringsend/_uring*.so
