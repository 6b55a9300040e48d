"""Fixtures: real loopback sockets, real files, and a check that no test leaks a file descriptor.
Shared helpers (sockets, readers, modes) live in helpers.py."""
import gc
import os

import psutil
import pytest

from uringsend.blocking import close_thread_ring
from helpers import tcp_pair, unix_pair


@pytest.fixture(autouse=True)
def no_fd_leak():
    """Fail a test that leaves file descriptors open (sockets, pipes, files, rings)."""
    proc = psutil.Process()
    gc.collect()
    before = proc.num_fds()
    yield
    # uringsend.sendfile() keeps a ring per thread (and its file mappings) between calls, by design
    close_thread_ring()
    after = proc.num_fds()  # before any gc.collect(): a Ring or Transfer kept by a cycle counts
    if after > before:
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        links = {}
        for fd in fds:
            try:
                links[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        pytest.fail(f"test leaked {after - before} file descriptor(s): {before} before, {after} after; "
                    f"open now: {links}")


@pytest.fixture
def tcp():
    a, b = tcp_pair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(params=["tcp", "unix"])
def any_pair(request):
    a, b = tcp_pair() if request.param == "tcp" else unix_pair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def make_file(tmp_path):
    """make_file(size, name=None) -> (path, bytes): a real file of random content."""
    def make(size, name=None):
        data = os.urandom(size)
        path = tmp_path / (name or f"data-{size}.bin")
        path.write_bytes(data)
        return path, data
    return make
