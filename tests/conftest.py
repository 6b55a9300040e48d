"""Fixtures: real loopback sockets, real files, and a check that no test leaks a file descriptor."""
import gc
import hashlib
import os
import socket
import threading

import psutil
import pytest

from uringsend.blocking import close_thread_ring


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


def tcp_pair(rcvbuf=None):
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        if rcvbuf:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
    finally:
        srv.close()
    return client, peer


def unix_pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


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


class Receiver:
    """Reads everything from a socket in a thread until EOF; ``join()`` returns the bytes."""

    def __init__(self, sock, gate=None):
        self.sock = sock
        self.gate = gate
        self.data = bytearray()
        self.error = None
        self.first_byte = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            if self.gate is not None:
                self.gate.wait()
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return
                self.data += chunk
                self.first_byte.set()
        except OSError as exc:
            self.error = exc

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receiver did not see EOF"
        return bytes(self.data)


@pytest.fixture
def make_file(tmp_path):
    """make_file(size, name=None) -> (path, bytes): a real file of random content."""
    def make(size, name=None):
        data = os.urandom(size)
        path = tmp_path / (name or f"data-{size}.bin")
        path.write_bytes(data)
        return path, data
    return make


def sha(data):
    return hashlib.sha256(data).hexdigest()
