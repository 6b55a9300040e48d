"""pytest plugin for `make test-asan` (loaded with ``-p _asan_check``): before any test runs, make
sure this process imported the sanitized copy of the extension named by URINGSEND_SANITIZED_EXT,
that it really is instrumented, and that libasan is loaded; print its path in the report header."""
import os

import pytest


def sanitized_extension():
    want = os.environ.get("URINGSEND_SANITIZED_EXT")
    if not want:
        raise pytest.UsageError("test-asan: URINGSEND_SANITIZED_EXT is not set (run `make test-asan`)")
    import uringsend._uring
    got = os.path.realpath(uringsend._uring.__file__)
    if os.path.dirname(got) != os.path.realpath(want):
        raise pytest.UsageError(f"test-asan: uringsend._uring is {got}, not the sanitized build in {want}")
    with open(got, "rb") as f:
        image = f.read()
    if b"__asan_report_" not in image or b"__ubsan_handle_" not in image:
        raise pytest.UsageError(f"test-asan: {got} is not built with -fsanitize=address,undefined")
    with open("/proc/self/maps") as f:
        if "libasan" not in f.read():
            raise pytest.UsageError("test-asan: libasan is not loaded in this process")
    return got


def pytest_configure(config):
    sanitized_extension()
    # Tests start clients (curl, python) while a server thread runs in this process. A child made
    # with vfork() runs in the parent's memory, sanitizer runtime included, until it execs; under
    # ASan a curl child once hung for 60 s that way (seen once, not reproduced). fork() gives the
    # child a copy of its own.
    import subprocess
    subprocess._USE_VFORK = False


def pytest_report_header(config):
    return [f"sanitized extension (ASan+UBSan): {sanitized_extension()}"]
