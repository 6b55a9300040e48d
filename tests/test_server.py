"""The static-file HTTP server, fetched by real clients (curl, http.client, raw sockets): exact
bodies, ranges, HEAD, keep-alive, validators and conditional requests, request targets and framing,
and every safety case (nothing outside the served directory is ever opened, let alone read; limits
and timeouts; clients that stall or vanish mid-body)."""
import asyncio
import ctypes
import email.utils
import hashlib
import http.client
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from uringsend.server import start_server
from helpers import MODES, reset, sha

SIZES = {"empty.bin": 0, "one.bin": 1, "page.txt": 4095, "4k.bin": 4096, "odd.bin": 65543,
         "1m.bin": 1 << 20, "5m.bin": (5 << 20) + 1}
SECRET = b"TOP-SECRET-" + os.urandom(8).hex().encode()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """www/ with files of every size, a sub-directory, a FIFO and symlinks in and out; secrets
    beside it. Returns (www path, {name: sha256})."""
    base = tmp_path_factory.mktemp("server")
    www = base / "www"
    (www / "sub" / "dir").mkdir(parents=True)
    digests = {}
    for name, size in SIZES.items():
        data = os.urandom(size)
        (www / name).write_bytes(data)
        digests[name] = sha(data)
    (www / "index.html").write_bytes(b"<!doctype html><title>index</title>\n")
    (www / "sub" / "dir" / "note.txt").write_bytes(b"deep\n")
    (base / "secret.txt").write_bytes(SECRET)
    (base / "secrets").mkdir()
    (base / "secrets" / "inner.txt").write_bytes(SECRET)
    os.symlink("../secret.txt", www / "escape.txt")
    os.symlink(str(base / "secret.txt"), www / "absolute-escape.txt")
    os.symlink("../secrets", www / "outside")
    os.symlink("4k.bin", www / "inside-link.bin")
    os.symlink(str(www / "4k.bin"), www / "absolute-inside.bin")
    os.mkfifo(www / "fifo")
    return www, digests


@pytest.fixture(scope="module")
def big_file(tree):
    www, _ = tree
    path = www / "64m.bin"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(16):
            chunk = os.urandom(4 << 20)
            h.update(chunk)
            f.write(chunk)
    yield path, h.hexdigest()
    path.unlink()


class ServerThread:
    """The server on its own loop in a background thread, stopped (and fully closed) on exit."""

    def __init__(self, root, mode="auto", **limits):
        self.ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(root, mode, limits),), daemon=True)
        self.thread.start()
        self.ready.wait(30)
        if self.error is not None:
            raise self.error

    async def _main(self, root, mode, limits):
        try:
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            self.server = await start_server(root, "127.0.0.1", 0, mode, **limits)
            self.port = self.server.port
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.ready.set()
        await self.stop.wait()
        await self.server.aclose()

    def statistics(self):
        async def stats():
            return self.server.statistics()
        return asyncio.run_coroutine_threadsafe(stats(), self.loop).result(10)

    def settled_statistics(self):
        """Statistics once every transfer the server started has settled (its memory released)."""
        async def settle():
            for handle in list(self.server._aring._active.values()):
                try:
                    await handle.released()
                except OSError:
                    pass  # cut-off responses end with their error; they settle all the same
            return self.server.statistics()
        return asyncio.run_coroutine_threadsafe(settle(), self.loop).result(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "server thread did not stop"


def fetch(port, path, method="GET", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw(port, request):
    """Send raw request bytes; read until the server closes. Returns everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def status_of(response):
    return int(response.split(b" ", 2)[1])


def curl(port, path, out, *args):
    """curl into ``out``; returns (status, headers text)."""
    proc = subprocess.run(["curl", "-sS", "--path-as-is", "-o", str(out), "-D", "-", *args,
                           f"http://127.0.0.1:{port}{path}"], capture_output=True, timeout=60, check=True)
    head = proc.stdout.decode("latin-1")
    return int(head.split(" ", 2)[1]), head


need_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make deps installs it)")


# ---- bodies ------------------------------------------------------------------------------------
@need_curl
@pytest.mark.parametrize("mode", MODES)
def test_every_size_is_byte_identical(mode, tree, tmp_path):
    www, digests = tree
    with ServerThread(www, mode) as srv:
        for name, digest in digests.items():
            status, head = curl(srv.port, f"/{name}", tmp_path / "out")
            assert status == 200
            assert f"Content-Length: {SIZES[name]}\r\n" in head
            assert sha((tmp_path / "out").read_bytes()) == digest, name
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            for name, digest in digests.items():
                conn.request("GET", f"/{name}")
                resp = conn.getresponse()
                assert resp.status == 200 and sha(resp.read()) == digest, name
        finally:
            conn.close()
        assert srv.settled_statistics()["ring"].transfers_active == 0


@need_curl
def test_64_mib_file(big_file, tree, tmp_path):
    www, _ = tree
    path, digest = big_file
    with ServerThread(www) as srv:
        status, head = curl(srv.port, "/64m.bin", tmp_path / "out")
        assert status == 200 and f"Content-Length: {64 << 20}\r\n" in head
        assert sha((tmp_path / "out").read_bytes()) == digest


@need_curl
def test_curl_range_and_head(tree, tmp_path):
    www, _ = tree
    data = (www / "odd.bin").read_bytes()
    with ServerThread(www) as srv:
        status, head = curl(srv.port, "/odd.bin", tmp_path / "out", "-r", "100-4195")
        assert status == 206 and f"Content-Range: bytes 100-4195/{len(data)}\r\n" in head
        assert (tmp_path / "out").read_bytes() == data[100:4196]
        status, head = curl(srv.port, "/odd.bin", tmp_path / "out", "-I")
        assert status == 200 and f"Content-Length: {len(data)}\r\n" in head
        assert (tmp_path / "out").read_bytes().endswith(b"Connection: keep-alive\r\n\r\n")  # no body


@pytest.mark.parametrize("spec,status,part", [
    ("bytes=0-99", 206, (0, 100)),
    ("bytes=100-", 206, (100, None)),
    ("bytes=-100", 206, (-100, None)),
    ("bytes=65000-999999", 206, (65000, None)),       # end past EOF is clamped
    ("bytes=-999999", 206, (0, None)),                # suffix longer than the file: all of it
    ("bytes=65543-", 416, None),                      # first byte past EOF
    ("bytes=-0", 416, None),
    ("bytes=9-5", 200, (0, None)),                    # invalid: ignored
    ("bytes=0-1,5-6", 200, (0, None)),                # several ranges: ignored
    ("items=0-5", 200, (0, None)),                    # unknown unit: ignored
    ("bytes=x-5", 200, (0, None)),
])
def test_range(spec, status, part, tree):
    www, _ = tree
    data = (www / "odd.bin").read_bytes()
    with ServerThread(www) as srv:
        got, headers, body = fetch(srv.port, "/odd.bin", headers={"Range": spec})
    assert got == status
    if status == 416:
        assert headers["Content-Range"] == f"bytes */{len(data)}"
        return
    expected = data[part[0]:part[1]]
    assert body == expected and int(headers["Content-Length"]) == len(expected)
    if status == 206:
        start = len(data) - len(expected) if part[0] < 0 else part[0]
        assert headers["Content-Range"] == f"bytes {start}-{start + len(expected) - 1}/{len(data)}"


def test_range_of_an_empty_file_is_unsatisfiable(tree):
    www, _ = tree
    with ServerThread(www) as srv:
        status, headers, _ = fetch(srv.port, "/empty.bin", headers={"Range": "bytes=0-"})
    assert status == 416 and headers["Content-Range"] == "bytes */0"


def test_head_and_headers(tree):
    www, _ = tree
    with ServerThread(www) as srv:
        status, headers, body = fetch(srv.port, "/page.txt", "HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == "4095"
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert headers["Accept-Ranges"] == "bytes"
        mtime = int(os.stat(www / "page.txt").st_mtime)
        assert headers["Last-Modified"] == email.utils.formatdate(mtime, usegmt=True)
        assert fetch(srv.port, "/4k.bin")[1]["Content-Type"] == "application/octet-stream"
        status, headers, body = fetch(srv.port, "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert body == (www / "index.html").read_bytes()
        assert fetch(srv.port, "/sub/dir/note.txt")[2] == b"deep\n"
        assert fetch(srv.port, "/inside-link.bin")[2] == (www / "4k.bin").read_bytes()
        assert fetch(srv.port, "/4k.bin?query=1#frag")[0] == 200
        assert fetch(srv.port, "/%34k.bin")[2] == (www / "4k.bin").read_bytes()  # %34 is '4'


def test_keep_alive_reuses_one_connection(tree):
    www, digests = tree
    with ServerThread(www) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            conn.request("GET", "/1m.bin")
            first = conn.getresponse()
            assert sha(first.read()) == digests["1m.bin"]
            sock = conn.sock
            conn.request("HEAD", "/missing")       # an error answer keeps the connection too
            assert conn.getresponse().read() == b""
            conn.request("GET", "/odd.bin")
            second = conn.getresponse()
            assert sha(second.read()) == digests["odd.bin"]
            assert conn.sock is sock
        finally:
            conn.close()
        stats = srv.statistics()
    assert stats["accepted"] == 1 and stats["requests"] == 3


def split_responses(data):
    """Consecutive responses with Content-Length bodies -> [(status, body)]."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)\r\n", head + b"\r\n").group(1))
        out.append((status_of(head), rest[:length]))
        data = rest[length:]
    return out


def test_pipelined_requests_are_answered_in_order(tree):
    www, _ = tree
    names = ("one.bin", "page.txt", "missing", "4k.bin")
    request = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % n.encode() for n in names[:-1])
    with ServerThread(www) as srv:
        got = raw(srv.port, request + b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert split_responses(got) == [(200, (www / "one.bin").read_bytes()), (200, (www / "page.txt").read_bytes()),
                                    (404, b"404 Not Found\n"), (200, (www / "4k.bin").read_bytes())]


def test_http_1_0_closes_after_the_response(tree):
    www, _ = tree
    with ServerThread(www) as srv:
        got = raw(srv.port, b"GET /one.bin HTTP/1.0\r\n\r\n")
    assert status_of(got) == 200 and b"Connection: close\r\n" in got
    assert got.endswith((www / "one.bin").read_bytes())


# ---- safety ------------------------------------------------------------------------------------
class Inotify:
    """Watches paths for IN_OPEN and IN_ACCESS: proof that the server never opened them."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, *paths):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        for path in paths:
            if self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN | self.IN_ACCESS) < 0:
                os.close(self.fd)
                pytest.skip(f"inotify_add_watch: {os.strerror(ctypes.get_errno())}")

    def events(self):
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return b""

    def close(self):
        os.close(self.fd)


TRAVERSALS = [
    ("/../secret.txt", 403), ("/%2e%2e/secret.txt", 403), ("/%2E%2E%2Fsecret.txt", 403),
    ("/..%2fsecret.txt", 403), ("/sub/../../secret.txt", 403), ("/sub/%2e%2e/%2e%2e/secret.txt", 403),
    ("/.%2e/secret.txt", 403), ("/escape.txt", 403), ("/absolute-escape.txt", 403),
    ("/outside/inner.txt", 403), ("/outside/", 403), ("/%00", 400), ("/4k.bin%00.txt", 400),
    ("//etc/passwd", 404), ("/etc/passwd", 404), ("/fifo", 404), ("/sub/", 404),
    ("/missing.bin", 404), ("/4k.bin/x", 404), ("/inside-link.bin", 200), ("/absolute-inside.bin", 200),
]


@pytest.mark.parametrize("resolver", ["openat2", "realpath"])
def test_traversal_attempts_never_touch_anything_outside(resolver, tree):
    """Both ways of opening: openat2(RESOLVE_BENEATH), and realpath plus the check of what was
    opened (the path taken where openat2 is missing or refuses an absolute symlink)."""
    www, _ = tree
    base = www.parent
    watch = Inotify(base / "secret.txt", base / "secrets" / "inner.txt", base / "secrets")
    try:
        with ServerThread(www) as srv:
            srv.server._beneath.works = resolver == "openat2"
            for target, expected in TRAVERSALS:
                got = raw(srv.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target.encode())
                assert status_of(got) == expected, target
                assert SECRET not in got
            if shutil.which("curl"):
                for target in ("/../secret.txt", "/%2e%2e/secret.txt", "/escape.txt", "/outside/inner.txt"):
                    status, _ = curl(srv.port, target, base / "curl-out")
                    assert status == 403 and SECRET not in (base / "curl-out").read_bytes()
        assert watch.events() == b"", "the server opened or read a file outside its directory"
    finally:
        watch.close()


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /4k.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
    (b"DELETE /4k.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"GARBAGE\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
    (b"GET /4k.bin HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    (b"GET /4k.bin HTTP/1.1\r\n\r\n", 400),                                   # no Host
    (b"GET 4k.bin HTTP/1.1\r\nHost: x\r\n\r\n", 400),                          # not origin-form
    (b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nBroken header\r\n\r\n", 400),
    (b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    (b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
    (b"GET /4k.bin HTTP/1.1\r\nHost: x\r\n" + b"X-F: 1\r\n" * 150 + b"\r\n", 431),
])
def test_bad_requests(request_bytes, status, tree):
    www, _ = tree
    with ServerThread(www) as srv:
        got = raw(srv.port, request_bytes)
        assert status_of(got) == status
        head, _, body = got.partition(b"\r\n\r\n")
        assert body == b"%d " % status + head.split(b"\r\n")[0].split(b" ", 2)[2] + b"\n"
        if status == 405:
            assert b"\r\nAllow: GET, HEAD\r\n" in head
        assert fetch(srv.port, "/one.bin")[0] == 200  # and the server goes on


def wait_hangup(sock, timeout=10):
    """Block until the socket is reset or hung up (POLLERR/POLLHUP), not merely readable."""
    poller = select.poll()
    poller.register(sock, 0)  # POLLERR and POLLHUP are always reported
    return poller.poll(timeout * 1000)


def test_idle_and_slow_request_heads_time_out(tree):
    www, _ = tree
    with ServerThread(www, idle_timeout=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as idle, \
                socket.create_connection(("127.0.0.1", srv.port), timeout=10) as slow:
            slow.sendall(b"GET /4k.bin HTTP/1.1\r\nHo")  # and nothing more
            assert idle.recv(1) == b""
            assert slow.recv(1) == b""
        assert srv.statistics()["requests"] == 0


@pytest.mark.parametrize("mode", ["auto", "zerocopy", "mmap"])
def test_stalled_reader_is_cut_off(mode, tree):
    """A client that stops reading mid-body: after send_timeout without progress the server
    cancels its transfer and resets the connection (which releases zero-copy pages at once)."""
    www, digests = tree
    with ServerThread(www, mode, send_timeout=0.3) as srv:
        client = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        with client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"GET /5m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_hangup(client), "the server did not give up on a stalled client"
        assert sha(fetch(srv.port, "/5m.bin")[2]) == digests["5m.bin"]
        stats = srv.settled_statistics()["ring"]
        assert stats.pending_notifs == 0 and stats.buffers_free == stats.buffers_total


@pytest.mark.parametrize("mode", MODES)
def test_client_vanishing_mid_body_costs_only_its_transfer(mode, tree):
    www, digests = tree
    with ServerThread(www, mode) as srv:
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"GET /5m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
            reset(client)
        assert sha(fetch(srv.port, "/5m.bin")[2]) == digests["5m.bin"]
        stats = srv.settled_statistics()["ring"]
        assert stats.transfers_active == 0 and stats.pending_notifs == 0


def test_connection_limit(tree):
    www, _ = tree
    with ServerThread(www, max_connections=2) as srv:
        held = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10) for _ in range(2)]
        try:
            for conn in held:  # each connection is being served (its handler is running)
                conn.request("GET", "/one.bin")
                assert conn.getresponse().read() == (www / "one.bin").read_bytes()
            got = raw(srv.port, b"GET /one.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(got) == 503
        finally:
            for conn in held:
                conn.close()
        assert srv.statistics()["refused"] == 1


# ---- command line ------------------------------------------------------------------------------
def test_serve_command_runs_with_no_arguments():
    """`python -m uringsend serve` with no DIR serves a generated demo tree, stops on SIGINT."""
    proc = subprocess.Popen([sys.executable, "-m", "uringsend", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(match.group(1))
        status, _, body = fetch(port, "/")
        assert status == 200 and b"hello.txt" in body
        assert fetch(port, "/hello.txt")[2].startswith(b"Hello from uringsend")
        assert len(fetch(port, "/1m.bin")[2]) == 1 << 20
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped: 3 requests" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_command_refuses_a_missing_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "uringsend", "serve", str(tmp_path / "nope"), "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not a directory" in proc.stderr


@pytest.mark.parametrize("mode", ["auto", "zerocopy"])
def test_stopping_with_a_response_in_flight(mode, tree):
    """aclose() with a stalled response and a refused client pending: transfers are cancelled,
    connections dropped, everything closed (the fd check holds), in bounded time."""
    www, _ = tree
    with ServerThread(www, mode, max_connections=1) as srv:
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /5m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stalled.recv(64).startswith(b"HTTP/1.1 200 OK")
        refused = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        assert refused.recv(64).startswith(b"HTTP/1.1 503")
    with stalled, refused:
        assert wait_hangup(stalled)


def test_pipelined_errors_and_files_keep_their_order(tree):
    """Error answers go through the stream transport, files through uringsend: a pipeline that
    mixes them comes back in request order."""
    www, _ = tree
    names = ("5m.bin", "missing", "4k.bin", "missing", "1m.bin")
    request = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % n.encode() for n in names)
    with ServerThread(www) as srv:
        got = raw(srv.port, request + b"GET /page.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    expected = [(200, (www / "5m.bin").read_bytes()), (404, b"404 Not Found\n"), (200, (www / "4k.bin").read_bytes()),
                (404, b"404 Not Found\n"), (200, (www / "1m.bin").read_bytes()), (200, (www / "page.txt").read_bytes())]
    assert split_responses(got) == expected


# ---- validators and conditional requests (RFC 9110, section 13) ----------------------------------
def http_date(seconds):
    return email.utils.formatdate(seconds, usegmt=True)


@pytest.fixture
def dated(tree):
    """www/dated.bin, last modified an hour ago (a strong date validator): (path, bytes, mtime)."""
    www, _ = tree
    path = www / "dated.bin"
    data = os.urandom(10000)
    path.write_bytes(data)
    mtime = int(os.stat(path).st_mtime) - 3600
    os.utime(path, (mtime, mtime))
    yield path, data, mtime
    path.unlink()


def head_fields(response):
    """Raw response -> (status, {name: value}, body)."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split(" ", 2)[1]), dict(line.split(": ", 1) for line in lines[1:]), body


def test_etag_on_200_206_head_and_304_and_it_follows_the_file(dated):
    path, data, mtime = dated
    with ServerThread(path.parent) as srv:
        status, headers, body = fetch(srv.port, "/dated.bin")
        etag = headers["ETag"]
        assert status == 200 and body == data and re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+-[0-9a-f]+"', etag)
        assert headers["Last-Modified"] == http_date(mtime)
        assert fetch(srv.port, "/dated.bin", "HEAD")[1]["ETag"] == etag
        status, headers, body = fetch(srv.port, "/dated.bin", headers={"Range": "bytes=0-9"})
        assert status == 206 and headers["ETag"] == etag and body == data[:10]
        got = raw(srv.port, b'GET /dated.bin HTTP/1.1\r\nHost: x\r\nIf-None-Match: %s\r\nConnection: close\r\n\r\n'
                  % etag.encode())
        status, headers, body = head_fields(got)
        assert status == 304 and body == b""
        assert set(headers) == {"Server", "Date", "ETag", "Connection"} and headers["ETag"] == etag
        os.utime(path, (mtime + 1, mtime + 1))  # same size, another modification time
        assert fetch(srv.port, "/dated.bin")[1]["ETag"] != etag


@pytest.mark.parametrize("field,status", [
    ("{etag}", 304),
    ("W/{etag}", 304),                     # If-None-Match compares weakly
    ('"other", {etag}', 304),
    ('"other",W/{etag} , "more"', 304),
    ("*", 304),
    ('"other"', 200),
    ('W/"other", "x"', 200),
    ("{etag}x", 200),                      # not an entity-tag list: matches nothing
    ("", 200),
])
def test_if_none_match(field, status, dated):
    path, data, _ = dated
    with ServerThread(path.parent) as srv:
        etag = fetch(srv.port, "/dated.bin", "HEAD")[1]["ETag"]
        for method in ("GET", "HEAD"):
            got, headers, body = fetch(srv.port, "/dated.bin", method, {"If-None-Match": field.format(etag=etag)})
            assert got == status
            expected = data if status == 200 and method == "GET" else b""
            assert body == expected and headers["ETag"] == etag


@pytest.mark.parametrize("when,status", [
    ("same", 304), ("later", 304), ("earlier", 200), ("rfc850", 304), ("asctime", 304),
    ("garbage", 200), ("empty", 200),
])
def test_if_modified_since(when, status, dated):
    path, data, mtime = dated
    field = {"same": http_date(mtime), "later": http_date(mtime + 60), "earlier": http_date(mtime - 1),
             "rfc850": time_format(mtime, "%A, %d-%b-%y %H:%M:%S GMT"),
             "asctime": time_format(mtime, "%a %b %e %H:%M:%S %Y"), "garbage": "yesterday", "empty": ""}[when]
    with ServerThread(path.parent) as srv:
        got, headers, body = fetch(srv.port, "/dated.bin", headers={"If-Modified-Since": field})
    assert got == status and body == (data if status == 200 else b"")


def time_format(seconds, fmt):
    return time.strftime(fmt, time.gmtime(seconds))


def test_if_none_match_overrides_if_modified_since(dated):
    path, data, mtime = dated
    with ServerThread(path.parent) as srv:
        etag = fetch(srv.port, "/dated.bin", "HEAD")[1]["ETag"]
        got, _, body = fetch(srv.port, "/dated.bin", headers={"If-None-Match": '"other"',
                                                              "If-Modified-Since": http_date(mtime)})
        assert got == 200 and body == data  # the date alone would have said 304
        got, _, body = fetch(srv.port, "/dated.bin", headers={"If-None-Match": etag,
                                                              "If-Modified-Since": http_date(mtime - 100)})
        assert got == 304 and body == b""


@pytest.mark.parametrize("fields,status", [
    ({"If-Match": "{etag}"}, 200),
    ({"If-Match": '"other", {etag}'}, 200),
    ({"If-Match": "*"}, 200),
    ({"If-Match": '"other"'}, 412),
    ({"If-Match": "W/{etag}"}, 412),                           # If-Match compares strongly
    ({"If-Unmodified-Since": "{same}"}, 200),
    ({"If-Unmodified-Since": "{earlier}"}, 412),
    ({"If-Unmodified-Since": "not a date"}, 200),              # ignored
    ({"If-Match": "{etag}", "If-Unmodified-Since": "{earlier}"}, 200),  # the date is ignored
    ({"If-Match": '"other"', "If-None-Match": "{etag}"}, 412),  # If-Match is evaluated first
])
def test_if_match_and_if_unmodified_since(fields, status, dated):
    path, data, mtime = dated
    with ServerThread(path.parent) as srv:
        etag = fetch(srv.port, "/dated.bin", "HEAD")[1]["ETag"]
        values = {"etag": etag, "same": http_date(mtime), "earlier": http_date(mtime - 1)}
        got, _, body = fetch(srv.port, "/dated.bin", headers={k: v.format(**values) for k, v in fields.items()})
    assert got == status
    assert body == (data if status == 200 else b"412 Precondition Failed\n")


@pytest.mark.parametrize("if_range,status", [
    ("{etag}", 206),
    ('"other"', 200),
    ("W/{etag}", 200),                   # a weak tag never matches in If-Range
    ("{same}", 206),
    ("{later}", 200),                    # a date must equal Last-Modified exactly
    ("{earlier}", 200),
    ("garbage", 200),
])
def test_if_range(if_range, status, dated):
    path, data, mtime = dated
    with ServerThread(path.parent) as srv:
        etag = fetch(srv.port, "/dated.bin", "HEAD")[1]["ETag"]
        values = {"etag": etag, "same": http_date(mtime), "later": http_date(mtime + 1),
                  "earlier": http_date(mtime - 1)}
        got, headers, body = fetch(srv.port, "/dated.bin",
                                   headers={"Range": "bytes=100-199", "If-Range": if_range.format(**values)})
    assert got == status and headers["ETag"] == etag
    if status == 206:
        assert body == data[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    else:
        assert sha(body) == sha(data) and "Content-Range" not in headers


def test_if_range_with_a_date_of_a_file_modified_this_second_is_not_strong(tree):
    """A Last-Modified date within the current second may hide a second change in that second:
    it is a weak validator, and If-Range with it sends the whole file."""
    www, _ = tree
    path = www / "fresh.bin"
    data = os.urandom(5000)
    path.write_bytes(data)
    future = int(os.stat(path).st_mtime) + 3600  # stays "this second or later" for the whole test
    os.utime(path, (future, future))
    try:
        with ServerThread(www) as srv:
            got, _, body = fetch(srv.port, "/fresh.bin", headers={"Range": "bytes=0-9", "If-Range": http_date(future)})
        assert got == 200 and body == data
    finally:
        path.unlink()


@need_curl
def test_curl_conditional_requests(dated, tmp_path):
    """curl's own conditional options: --etag-save/--etag-compare and -z (If-Modified-Since)."""
    path, data, mtime = dated
    tags = tmp_path / "etag.txt"
    with ServerThread(path.parent) as srv:
        status, head = curl(srv.port, "/dated.bin", tmp_path / "out", "--etag-save", str(tags))
        assert status == 200 and (tmp_path / "out").read_bytes() == data
        status, head = curl(srv.port, "/dated.bin", tmp_path / "out2", "--etag-compare", str(tags))
        assert status == 304 and "Content-Length" not in head
        status, _ = curl(srv.port, "/dated.bin", tmp_path / "out3", "-z", http_date(mtime))
        assert status == 304
        status, _ = curl(srv.port, "/dated.bin", tmp_path / "out4", "-z", http_date(mtime - 10))
        assert status == 200 and sha((tmp_path / "out4").read_bytes()) == sha(data)


def test_304_keeps_the_connection_and_the_pipeline_order(dated):
    path, data, mtime = dated
    with ServerThread(path.parent) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            conn.request("GET", "/dated.bin")
            first = conn.getresponse()
            etag = first.getheader("ETag")
            assert first.read() == data
            conn.request("GET", "/dated.bin", headers={"If-None-Match": etag})
            second = conn.getresponse()
            assert second.status == 304 and second.read() == b""
            conn.request("GET", "/dated.bin", headers={"If-None-Match": '"changed"'})
            third = conn.getresponse()
            assert third.status == 200 and third.read() == data
        finally:
            conn.close()
        request = (b"GET /dated.bin HTTP/1.1\r\nHost: x\r\nIf-None-Match: %s\r\n\r\n" % etag.encode()
                   + b"GET /dated.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = raw(srv.port, request)
        assert srv.statistics()["accepted"] == 2
    first, _, rest = got.partition(b"\r\n\r\n")
    assert status_of(first) == 304 and b"Content-Length" not in first
    assert split_responses(rest) == [(200, data)]


# ---- request targets -----------------------------------------------------------------------------
@pytest.mark.parametrize("target,status", [
    (b"http://example.test/4k.bin", 200),
    (b"http://example.test:8080/4k.bin?x=1#f", 200),
    (b"HTTP://EXAMPLE.TEST/4k.bin", 200),
    (b"https://example.test/4k.bin", 200),
    (b"http://example.test/%34k.bin", 200),
    (b"http://example.test", 200),                      # no path: the directory's index
    (b"http://example.test/../secret.txt", 403),
    (b"http://example.test/%2e%2e/secret.txt", 403),
    (b"http://example.test/escape.txt", 403),
    (b"http://example.test/missing", 404),
    (b"ftp://example.test/4k.bin", 400),
    (b"http:///4k.bin", 400),
])
def test_absolute_form_targets(target, status, tree):
    """RFC 9112 3.2.2: a server accepts the absolute form (proxies send it) and takes the path
    from it; the host named there is not looked at (every name serves the same directory)."""
    www, _ = tree
    with ServerThread(www) as srv:
        got = raw(srv.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
    assert status_of(got) == status and SECRET not in got
    if status == 200:
        name = "index.html" if target == b"http://example.test" else "4k.bin"
        assert got.partition(b"\r\n\r\n")[2] == (www / name).read_bytes()


def test_absolute_form_through_a_proxy_client(tree, tmp_path):
    """curl talking to the server as to a proxy sends absolute-form targets."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (make deps installs it)")
    www, digests = tree
    with ServerThread(www) as srv:
        proc = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "out"), "-w", "%{http_code}", "--noproxy", "",
                               "--proxy", f"http://127.0.0.1:{srv.port}", "http://files.example.test/odd.bin"],
                              capture_output=True, timeout=60, check=True)
    assert proc.stdout == b"200" and sha((tmp_path / "out").read_bytes()) == digests["odd.bin"]


# ---- framing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),              # two Host fields
    (b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n", 400),
    (b"GET /4k.bin HTTP/1.1\nHost: x\n\n", 400),                                # bare LF
    (b"GET /4k.bin HTTP/1.1\r\nHost : x\r\n\r\n", 400),                         # space before colon
    (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 405),
])
def test_more_bad_requests(request_bytes, status, tree):
    www, _ = tree
    with ServerThread(www) as srv:
        got = raw(srv.port, request_bytes)
        assert status_of(got) == status and b"Connection: close\r\n" in got
        assert fetch(srv.port, "/one.bin")[0] == 200


def test_upgrade_is_declined_and_the_answer_closes_the_connection(tree):
    www, _ = tree
    with ServerThread(www) as srv:
        got = raw(srv.port, b"GET /4k.bin HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                            b"GET /one.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    assert split_responses(got) == [(200, (www / "4k.bin").read_bytes())]
    assert b"Connection: close\r\n" in got


def test_http_1_0_keep_alive(tree):
    www, _ = tree
    with ServerThread(www) as srv:
        got = raw(srv.port, b"GET /one.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /one.bin HTTP/1.0\r\n\r\n")
    assert split_responses(got) == [(200, (www / "one.bin").read_bytes())] * 2
    assert got.count(b"Connection: keep-alive\r\n") == 1 and got.count(b"Connection: close\r\n") == 1


def test_a_long_pipeline_is_answered_in_order(tree):
    """More pipelined requests than the server holds parsed at once (it stops reading and
    resumes): every one answered, in order."""
    www, _ = tree
    names = [("4k.bin", "missing", "one.bin", "odd.bin")[i % 4] for i in range(300)]
    request = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % n.encode() for n in names)
    with ServerThread(www) as srv:
        got = raw(srv.port, request + b"GET /one.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert srv.statistics()["requests"] == 301
    expected = [(404, b"404 Not Found\n") if n == "missing" else (200, (www / n).read_bytes()) for n in names]
    assert split_responses(got) == expected + [(200, (www / "one.bin").read_bytes())]


def test_requests_after_one_that_closes_are_not_answered(tree):
    www, _ = tree
    with ServerThread(www) as srv:
        got = raw(srv.port, b"GET /one.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                            b"GET /4k.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert srv.statistics()["requests"] == 1
    assert split_responses(got) == [(200, (www / "one.bin").read_bytes())]


def test_head_size_limit_counts_each_byte_once(tree):
    """A head just under the limit that arrives in many small pieces is served; a field value
    that never ends is cut off at the limit without waiting for its end."""
    www, _ = tree
    head = b"GET /one.bin HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 15000 + b"\r\nConnection: close\r\n\r\n"
    assert len(head) < 16 << 10
    with ServerThread(www) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(head), 7):
                s.sendall(head[i:i + 7])
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert split_responses(got) == [(200, (www / "one.bin").read_bytes())]
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"GET /one.bin HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            sent = 0
            try:
                while sent < 8 << 20:  # the server answers and closes long before
                    s.sendall(b"e" * 4096)
                    sent += 4096
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert sent < 8 << 20


# ---- files kept open between requests ------------------------------------------------------------
def test_a_path_served_again_follows_what_it_names_now(tree):
    """The server keeps served files open for the next request of the same path; each request
    still gets what the path names at that moment: a file rewritten in place, replaced by a
    rename, deleted; a symlink retargeted inside, or outside (403, and the outside file is never
    opened); a directory's index page replaced."""
    www, _ = tree
    base = www.parent
    (www / "live").mkdir()
    path, link = www / "live" / "data.bin", www / "live" / "link.bin"
    first, second, third = os.urandom(3000), os.urandom(5000), os.urandom(7000)
    path.write_bytes(first)
    (www / "live" / "other.bin").write_bytes(second)
    os.symlink("data.bin", link)
    (www / "live" / "index.html").write_bytes(b"one\n")
    watch = Inotify(base / "secret.txt")
    try:
        with ServerThread(www) as srv:
            assert fetch(srv.port, "/live/data.bin")[2] == first
            assert fetch(srv.port, "/live/link.bin")[2] == first
            assert fetch(srv.port, "/live/")[2] == b"one\n"
            assert srv.statistics()["open_files"] == 3
            with open(path, "r+b") as f:                       # in place: same inode
                f.write(b"X" * 10)
                f.write(os.urandom(6000))
            status, headers, body = fetch(srv.port, "/live/data.bin")
            assert status == 200 and body == path.read_bytes() and headers["Content-Length"] == "6010"
            tmp = www / "live" / "new.tmp"
            tmp.write_bytes(third)
            os.replace(tmp, path)                                # renamed over: another inode
            assert fetch(srv.port, "/live/data.bin")[2] == third
            assert fetch(srv.port, "/live/link.bin")[2] == third
            os.unlink(link)
            os.symlink("other.bin", link)                        # retargeted inside
            assert fetch(srv.port, "/live/link.bin")[2] == second
            os.unlink(link)
            os.symlink("../../secret.txt", link)                 # retargeted outside
            got = raw(srv.port, b"GET /live/link.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status_of(got) == 403 and SECRET not in got
            (www / "live" / "index.tmp").write_bytes(b"two\n")
            os.replace(www / "live" / "index.tmp", www / "live" / "index.html")
            assert fetch(srv.port, "/live/")[2] == b"two\n"
            path.unlink()
            assert fetch(srv.port, "/live/data.bin")[0] == 404
        assert watch.events() == b"", "the server opened or read a file outside its directory"
    finally:
        watch.close()
        shutil.rmtree(www / "live")


def test_files_kept_open_are_bounded(tree):
    from uringsend.server import OPEN_FILES
    www, _ = tree
    (www / "many").mkdir()
    try:
        for i in range(OPEN_FILES + 10):
            (www / "many" / f"{i}.txt").write_bytes(b"%d\n" % i)
        with ServerThread(www) as srv:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            try:
                for i in range(OPEN_FILES + 10):
                    conn.request("GET", f"/many/{i}.txt")
                    assert conn.getresponse().read() == b"%d\n" % i
                conn.request("GET", "/many/0.txt")  # dropped as the oldest: opened again
                assert conn.getresponse().read() == b"0\n"
            finally:
                conn.close()
            assert srv.statistics()["open_files"] == OPEN_FILES
    finally:
        shutil.rmtree(www / "many")
