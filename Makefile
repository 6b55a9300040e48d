# `make demo` and `make test` each install what they need on a fresh Debian machine (as root):
# liburing-dev from apt when pkg-config cannot find liburing, a virtualenv, an editable build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
APT := DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: deps test test-asan demo bench bench-quick clean

deps: $(STAMP)

$(STAMP): pyproject.toml setup.py build_ffi.py uringsend/_core.c uringsend/_core.h uringsend/_probe.c uringsend/_uring.h
	@if ! pkg-config --exists liburing 2>/dev/null || ! command -v curl >/dev/null; then \
		$(APT) update -qq && $(APT) install -y -qq liburing-dev pkg-config curl; fi
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

test: deps
	$(PY) -m pytest -q -ra

# `make test-asan`: the whole suite against a copy of the package (build/asan/lib) whose extension
# is compiled with AddressSanitizer + UndefinedBehaviorSanitizer (build_ffi.py reads
# URINGSEND_SANITIZE=1); the editable build in uringsend/ is left alone. CPython is not built with
# ASan, so libasan is preloaded. ASan reports, also from child processes, land in build/asan/logs
# and fail the run. UBSan reports are fatal and go to stderr (UBSan ignores log_path next to a
# preloaded libasan), so pytest leaves stderr alone (--capture=sys). PYTHONSAFEPATH keeps
# `python -m ...` (pytest's children) from putting the source tree ahead of the copy; which
# extension is loaded is checked before and inside pytest (tests/_asan_check.py).
ASAN_DIR := build/asan
ASAN_PKG := $(CURDIR)/$(ASAN_DIR)/lib/uringsend
ASAN_EXT := $(ASAN_DIR)/ext
ASAN_LOGS := $(CURDIR)/$(ASAN_DIR)/logs
ASAN_BIN := $(CURDIR)/$(ASAN_DIR)/bin
# libstdc++ is preloaded too: ASan resolves its __cxa_throw interceptor at start-up, and a C++
# extension (matplotlib, in the benchmark's test) throwing without it is a fatal CHECK.
ASAN_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	PATH=$(ASAN_BIN):$$PATH \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:log_path=$(ASAN_LOGS)/asan \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(ASAN_LOGS)/ubsan \
	PYTHONSAFEPATH=1 PYTHONPATH=$(CURDIR)/$(ASAN_DIR)/lib:$(CURDIR):$(CURDIR)/tests \
	URINGSEND_SANITIZED_EXT=$(ASAN_PKG)
ASAN_PYTEST_ARGS ?=
# RSS under ASan's allocator is not uringsend's: freed memory waits in ASan's quarantine (up to
# 256 MiB), so the 100 000-transfer soak's RSS bound cannot hold there. `make test` runs it.
ASAN_DESELECT := --deselect tests/test_reliability_soak.py::test_soak_100k_small_transfers_with_resets

$(ASAN_EXT)/.built: $(STAMP) build_ffi.py setup.py pyproject.toml $(shell find uringsend -name '*.[ch]')
	rm -rf $(ASAN_EXT) $(ASAN_DIR)/temp
	URINGSEND_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(ASAN_EXT) --build-temp $(ASAN_DIR)/temp
	@touch $@

test-asan: $(ASAN_EXT)/.built
	rm -rf $(ASAN_DIR)/lib $(ASAN_LOGS)
	mkdir -p $(ASAN_PKG) $(ASAN_BIN) $(ASAN_LOGS) && chmod 1777 $(ASAN_LOGS)
	@# curl (the server tests' client) deadlocks in setlocale() with libasan preloaded: run it without
	printf '#!/bin/sh\nunset LD_PRELOAD\nexec %s "$$@"\n' "$$(command -v curl)" > $(ASAN_BIN)/curl
	chmod +x $(ASAN_BIN)/curl
	cp -R uringsend/. $(ASAN_PKG)/
	find $(ASAN_PKG) \( -name __pycache__ -o -name '*.so' -o -name '*.o' \) -prune -exec rm -rf {} +
	cp $(ASAN_EXT)/uringsend/_uring*.so $(ASAN_PKG)/
	@got=$$($(ASAN_ENV) $(PY) -c 'import uringsend._uring as u; print(u.__file__)') && \
		echo "test-asan: uringsend._uring is $$got" && \
		case "$$got" in $(ASAN_PKG)/*) ;; *) echo "test-asan: not the sanitized build" >&2; exit 1;; esac
	@$(ASAN_ENV) $(PY) -m pytest -p _asan_check --capture=sys -q -ra $(ASAN_DESELECT) $(ASAN_PYTEST_ARGS); rc=$$?; \
		if [ -n "$$(ls -A $(ASAN_LOGS))" ]; then cat $(ASAN_LOGS)/*; \
			echo "test-asan: sanitizer reports above ($(ASAN_LOGS))" >&2; exit 1; fi; \
		exit $$rc

demo: deps
	$(PY) -m uringsend demo

bench: deps
	$(PY) -m bench

bench-quick: deps
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info uringsend/_uring*.so
