"""uringsend.aio.install(): loop.sendfile() and loop.sock_sendfile() through io_uring on asyncio's
selector loop and on uvloop. aiohttp's web.FileResponse serves real files to curl, http.client and
aiohttp clients; the stdlib's own behaviour is the reference for every check and error."""
import asyncio
import contextlib
import errno
import hashlib
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys

import aiohttp
import aiohttp.web_fileresponse
import pytest
import uvloop
from aiohttp import web

import uringsend.aio
from uringsend.aio import install, install_statistics, sendfile_options, uninstall
from uringsend._aioinstall import NOT_REGULAR, SMALL, TLS, UNAVAILABLE
from _faults import block_io_uring, private_file, run_child
from helpers import read_async, sha, tcp_pair

LOOPS = ["asyncio", "uvloop"]
BIG = (1 << 20) + 4099          # through io_uring in mode 'auto'
need_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make deps installs it)")


def test_aiohttp_would_call_loop_sendfile():
    assert not aiohttp.web_fileresponse.NOSENDFILE, (
        "AIOHTTP_NOSENDFILE is set: aiohttp would never call loop.sendfile(); unset it to test install()")


def run(kind, main, timeout=60):
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), timeout))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


@pytest.fixture(scope="module", autouse=True)
def uvloop_child_pipe():
    """libuv opens a pipe for SIGCHLD on a process's first child and keeps it for good: open it
    before the fd fixture counts."""
    async def main():
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
    run("uvloop", main)


@pytest.fixture
def installed():
    install()
    yield
    uninstall()


def delta(before):
    """What install_statistics() counted since ``before``."""
    after = install_statistics()
    fallbacks = {k: after.fallbacks.get(k, 0) - before.fallbacks.get(k, 0) for k in after.fallbacks}
    return dict(transfers=after.transfers - before.transfers, bytes_sent=after.bytes_sent - before.bytes_sent,
                errors=after.errors - before.errors, small_writes=after.small_writes - before.small_writes,
                fallbacks={k: v for k, v in fallbacks.items() if v})


# ---- aiohttp's FileResponse ---------------------------------------------------------------------
@contextlib.asynccontextmanager
async def file_server(root, ssl_context=None):
    async def serve(request):
        return web.FileResponse(root / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def curl(*args):
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--fail", *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out


def fetch(port, requests):
    """http.client on one keep-alive connection: [(status, headers, body)] for each (method, path,
    headers) in ``requests``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        out = []
        for method, path, headers in requests:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            out.append((resp.status, dict(resp.getheaders()), resp.read()))
        return out
    finally:
        conn.close()


@need_curl
@pytest.mark.parametrize("kind", LOOPS)
def test_aiohttp_file_response_through_io_uring(kind, installed, tmp_path):
    """curl and http.client (two requests on one keep-alive connection, a Range and a HEAD) get
    the file's exact bytes; the bodies above SMALL went through io_uring, byte for byte."""
    big, small = os.urandom(BIG), os.urandom(4000)
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "small.bin").write_bytes(small)

    async def main():
        async with file_server(tmp_path) as port:
            before = install_statistics()
            got_curl = await curl(f"http://127.0.0.1:{port}/big.bin")
            got_range = await curl("-r", "1000-300999", f"http://127.0.0.1:{port}/big.bin")
            replies = await asyncio.to_thread(fetch, port, [
                ("GET", "/big.bin", {}), ("GET", "/small.bin", {}), ("HEAD", "/big.bin", {}),
                ("GET", "/big.bin", {"Range": "bytes=70000-"})])
            return got_curl, got_range, replies, delta(before)

    got_curl, got_range, replies, counted = run(kind, main)
    assert sha(got_curl) == sha(big)
    assert sha(got_range) == sha(big[1000:301000])
    (s1, _, b1), (s2, _, b2), (s3, h3, b3), (s4, h4, b4) = replies
    assert (s1, sha(b1)) == (200, sha(big))
    assert (s2, sha(b2)) == (200, sha(small))
    assert (s3, h3["Content-Length"], b3) == (200, str(BIG), b"")
    assert (s4, h4["Content-Range"], sha(b4)) == (206, f"bytes 70000-{BIG - 1}/{BIG}", sha(big[70000:]))
    assert counted == dict(transfers=4, bytes_sent=2 * BIG + 300000 + BIG - 70000, errors=0,
                           small_writes=1, fallbacks={})
    assert install_statistics().rings == 0  # the loop closed its ring


@pytest.mark.parametrize("kind", LOOPS)
def test_200_concurrent_downloads(kind, installed, tmp_path):
    data = os.urandom(256 << 10)
    (tmp_path / "f.bin").write_bytes(data)

    async def main():
        async with file_server(tmp_path) as port:
            before = install_statistics()
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                async def get():
                    async with session.get(f"http://127.0.0.1:{port}/f.bin") as resp:
                        assert resp.status == 200
                        return hashlib.sha256(await resp.read()).hexdigest()
                digests = await asyncio.gather(*(get() for _ in range(200)))
            return digests, delta(before)

    digests, counted = run(kind, main)
    assert digests == [sha(data)] * 200
    assert counted == dict(transfers=200, bytes_sent=200 * len(data), errors=0, small_writes=0, fallbacks={})


@pytest.mark.parametrize("kind", LOOPS)
def test_client_disconnecting_mid_body(kind, installed, tmp_path):
    """A client that resets the connection after 64 KiB of a 16 MiB body: that transfer ends with
    an error, the server goes on serving, nothing is left open (the fd fixture)."""
    data = os.urandom(16 << 20)
    (tmp_path / "f.bin").write_bytes(data)

    async def main():
        loop = asyncio.get_running_loop()
        async with file_server(tmp_path) as port:
            before = install_statistics()
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, b"GET /f.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                got = 0
                while got < (64 << 10):
                    chunk = await loop.sock_recv(sock, 65536)
                    assert chunk
                    got += len(chunk)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            after = await asyncio.to_thread(fetch, port, [("GET", "/f.bin", {})])
        return after, delta(before)  # the runner's cleanup waited for the failed handler

    [(status, _, body)], counted = run(kind, main)
    assert (status, sha(body)) == (200, sha(data))
    assert counted["transfers"] == 2 and counted["errors"] == 1
    assert len(data) <= counted["bytes_sent"] < 2 * len(data)


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS test")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(d / "cert.pem", d / "key.pem")
    client = ssl.create_default_context(cafile=str(d / "cert.pem"))
    client.check_hostname = False
    return server, client


@pytest.mark.parametrize("kind", LOOPS)
def test_tls_transport_is_left_to_the_loop(kind, installed, tls_contexts, tmp_path):
    """io_uring cannot encrypt: a TLS transport goes to what the loop did before (the selector
    loop's read+write fallback; uvloop's NotImplementedError, after which aiohttp reads the file
    itself), and is counted."""
    server_ctx, client_ctx = tls_contexts
    data = os.urandom(BIG)
    (tmp_path / "f.bin").write_bytes(data)

    async def main():
        async with file_server(tmp_path, server_ctx) as port:
            before = install_statistics()
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/f.bin", ssl=client_ctx) as resp:
                    body = await resp.read()
            return body, delta(before)

    body, counted = run(kind, main)
    assert sha(body) == sha(data)
    assert counted == dict(transfers=0, bytes_sent=0, errors=0, small_writes=0, fallbacks={TLS: 1})


# ---- transports: what was written first goes first -----------------------------------------
@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("mode", ["auto", "copy"])
def test_buffered_bytes_go_first_and_the_transport_stays_usable(kind, mode, installed, make_file):
    """8 MiB written to the transport (far past its high-water mark) before loop.sendfile(): the
    peer gets them first, then the file, then what the stream writes afterwards; drain() works."""
    path, data = make_file(BIG)
    lead = os.urandom(8 << 20)

    async def main():
        loop = asyncio.get_running_loop()
        results = []

        async def handle(reader, writer):
            with open(path, "rb") as f, sendfile_options(mode=mode):
                writer.write(lead)
                results.append(await loop.sendfile(writer.transport, f, 5, None))
                results.append(f.tell())
            writer.write(b"tail")
            await writer.drain()
            request = await reader.readline()  # reading was resumed
            writer.write(request)
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            before = install_statistics()
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(b"again\n")
            got = await reader.read()
            writer.close()
            await writer.wait_closed()
        return results, got, delta(before)

    results, got, counted = run(kind, main)
    assert results == [BIG - 5, BIG]
    assert sha(got) == sha(lead + data[5:] + b"tail" + b"again\n")
    assert counted["transfers"] == 1 and counted["bytes_sent"] == BIG - 5


# ---- loop.sock_sendfile() ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("offset, count", [(0, None), (100, 300000), (7, 1000), (BIG - 10, 50)])
def test_sock_sendfile_return_value_and_file_position(kind, offset, count, installed, make_file):
    path, data = make_file(BIG)
    want = data[offset:] if count is None else data[offset:offset + count]

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        with client, peer, open(path, "rb") as f:
            before = install_statistics()
            sending = asyncio.ensure_future(loop.sock_sendfile(client, f, offset, count))
            got = await read_async(peer, len(want))
            return await sending, f.tell(), got, delta(before)

    sent, position, got, counted = run(kind, main)
    assert (sent, position, sha(got)) == (len(want), offset + len(want), sha(want))
    through_ring = len(want) > SMALL
    assert counted == dict(transfers=int(through_ring), bytes_sent=len(want) if through_ring else 0, errors=0,
                           small_writes=int(not through_ring), fallbacks={})


@pytest.mark.parametrize("kind", LOOPS)
def test_sock_sendfile_at_or_past_the_end_sends_nothing(kind, installed, make_file):
    path, data = make_file(5000)

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        with client, peer, open(path, "rb") as f:
            f.seek(123)
            return [await loop.sock_sendfile(client, f, 5000), await loop.sock_sendfile(client, f, 9999, 10),
                    f.tell()]

    assert run(kind, main) == [0, 0, 123]


BAD_CALLS = {  # (socket, binary file, text file, UDP socket, closed file) -> arguments
    "count 0": lambda sock, f, text, udp, closed: (sock, f, 0, 0),
    "count -5": lambda sock, f, text, udp, closed: (sock, f, 0, -5),
    "count str": lambda sock, f, text, udp, closed: (sock, f, 0, "5"),
    "offset -1": lambda sock, f, text, udp, closed: (sock, f, -1, None),
    "offset float": lambda sock, f, text, udp, closed: (sock, f, 1.5, None),
    "text file": lambda sock, f, text, udp, closed: (sock, text, 0, None),
    "udp socket": lambda sock, f, text, udp, closed: (udp, f, 0, None),
    "closed file": lambda sock, f, text, udp, closed: (sock, closed, 0, None),
}


def _error_of(kind, name, path):
    """(type, text) of what loop.sock_sendfile raises for BAD_CALLS[name] on this loop."""
    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setblocking(False)
        with open(path, "rb") as closed:
            pass
        with client, peer, udp, open(path, "rb") as f, open(path, "r") as text:
            with pytest.raises((TypeError, ValueError)) as info:
                await loop.sock_sendfile(*BAD_CALLS[name](client, f, text, udp, closed))
            return type(info.value), str(info.value)
    return run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_what_the_stdlib_raises(kind, name, make_file):
    path, _ = make_file(5000)
    expected = _error_of("asyncio", name, path)  # the stdlib loop, nothing installed
    install()
    try:
        assert _error_of(kind, name, path) == expected
    finally:
        uninstall()


class PipeReader:
    """A pipe's reading end without seek(): the stdlib's read+send fallback seeks any file that has
    one when it is done, which raises io.UnsupportedOperation for a pipe (after sending it)."""

    mode = "rb"

    def __init__(self, pipe):
        self.fileno, self.readinto = pipe.fileno, pipe.readinto


@pytest.mark.parametrize("kind", LOOPS)
def test_pipe_as_the_file_falls_back(kind, installed):
    """A pipe is not a regular file: the previous method gets the call (the selector loop reads
    and sends it; uvloop raises NotImplementedError as it did); with fallback=False both raise
    SendfileNotAvailableError. Each case is counted."""
    payload = os.urandom(50000)

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        r, w = os.pipe()
        with client, peer, open(r, "rb") as pipe:
            with open(w, "wb") as sink:
                sink.write(payload)
            src = PipeReader(pipe)
            before = install_statistics()
            # (with count=None the selector loop's native path takes the pipe's st_size, 0, for
            # the file's size and returns 0: a count makes it try, and fail, to send)
            with pytest.raises(asyncio.SendfileNotAvailableError):
                await loop.sock_sendfile(client, src, 0, len(payload), fallback=False)
            if kind == "uvloop":
                with pytest.raises(NotImplementedError):
                    await loop.sock_sendfile(client, src, 0, len(payload))
                return None, delta(before)
            sending = asyncio.ensure_future(loop.sock_sendfile(client, src, 0, len(payload)))
            got = await read_async(peer, len(payload))
            return (await sending, got), delta(before)

    result, counted = run(kind, main)
    assert counted == dict(transfers=0, bytes_sent=0, errors=0, small_writes=0, fallbacks={NOT_REGULAR: 2})
    if kind == "asyncio":
        assert result == (len(payload), payload)


@pytest.mark.parametrize("kind", LOOPS)
def test_cancelled_send_raises_and_leaves_nothing(kind, installed, make_file):
    """A peer that never reads: cancelling the task cancels the transfer; the loop's close
    waits for the kernel to let go of it and closes the ring."""
    path, _ = make_file(8 << 20)

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        with client, peer, open(path, "rb") as f:
            before = install_statistics()
            sending = asyncio.ensure_future(loop.sock_sendfile(client, f))
            await asyncio.sleep(0)  # one loop iteration: the task runs up to its wait on the transfer
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            return f.tell(), delta(before)

    position, counted = run(kind, main)
    assert counted["transfers"] == 1 and counted["errors"] == 1
    assert position == counted["bytes_sent"]
    assert install_statistics().rings == 0


def child_without_io_uring():
    """In a process whose seccomp filter fails io_uring_setup with EPERM: what sock_sendfile does
    on each loop, and what was counted."""
    block_io_uring(errno.EPERM)
    install()
    f, data = private_file(BIG)
    out = {}
    for kind in LOOPS:
        async def main():
            loop = asyncio.get_running_loop()
            client, peer = tcp_pair(blocking=False)
            with client, peer:
                try:
                    sending = asyncio.ensure_future(loop.sock_sendfile(client, f, 0, BIG))
                    got = await read_async(peer, BIG) if kind == "asyncio" else b""
                    return [await sending, got == data]
                except NotImplementedError:
                    return "NotImplementedError"
        out[kind] = run(kind, main)
    out["fallbacks"] = dict(install_statistics().fallbacks)
    return out


def test_io_uring_unavailable_falls_back():
    code, out, err = run_child(child_without_io_uring)
    assert code == 0, err[-2000:]
    assert out == {"asyncio": [BIG, True], "uvloop": "NotImplementedError", "fallbacks": {UNAVAILABLE: 2}}


# ---- options and releases ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("mode", ["mmap", "zerocopy", "copy"])
def test_sendfile_options_choose_the_mode_and_report_releases(kind, mode, installed, make_file):
    path, data = make_file(BIG)

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        released = []
        with client, peer, open(path, "rb") as f:
            with sendfile_options(mode=mode, on_release=released.append) as scope:
                sending = asyncio.ensure_future(loop.sock_sendfile(client, f))
                got = await read_async(peer, len(data))
                sent = await sending
            await scope.released()
            return sent, got, released, [h.mode for h in scope.transfers]

    sent, got, released, modes = run(kind, main)
    assert (sent, sha(got), modes) == (len(data), sha(data), [mode])
    assert sum(e.nbytes for e in released if e.offset is not None) == len(data)
    assert all(e.kind == "released" for e in released)


@pytest.mark.parametrize("kind", LOOPS)
def test_small_auto_write_reports_its_release(kind, installed, make_file):
    """In mode 'auto' a small range is written by the loop's thread: the socket copied it, so it
    is released at once, and on_release hears of it."""
    path, data = make_file(3000)

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        released = []
        with client, peer, open(path, "rb") as f, sendfile_options(on_release=released.append) as scope:
            sent = await loop.sock_sendfile(client, f, 10)
            got = await read_async(peer, sent)
            await scope.released()
            return sent, got, [(e.kind, e.offset, e.nbytes, e.copied) for e in released], scope.transfers

    sent, got, released, transfers = run(kind, main)
    assert (sent, got, released, transfers) == (2990, data[10:], [("released", 10, 2990, True)], [])


@pytest.mark.parametrize("kind", LOOPS)
def test_aiohttp_handler_with_options(kind, installed, tmp_path):
    """The documented pattern: a handler sets options for its own request (aiohttp sends the file
    in the response's prepare(), in the request's task, after the handler returned). The next
    request on the same connection has its own task and the default mode."""
    data = os.urandom(BIG)
    (tmp_path / "f.bin").write_bytes(data)
    scopes, released = [], []

    async def handler(request):
        if request.query.get("mmap"):
            scopes.append(sendfile_options(mode="mmap", on_release=released.append))
        return web.FileResponse(tmp_path / "f.bin")

    async def main():
        app = web.Application()
        app.router.add_get("/f", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            before = install_statistics()
            replies = await asyncio.to_thread(fetch, runner.addresses[0][1],
                                              [("GET", "/f?mmap=1", {}), ("GET", "/f", {})])
            [scope] = scopes
            await scope.released()
            return replies, [h.mode for h in scope.transfers], delta(before)
        finally:
            await runner.cleanup()

    replies, modes, counted = run(kind, main)
    assert [(status, sha(body)) for status, _, body in replies] == [(200, sha(data))] * 2
    assert modes == ["mmap"]
    assert sum(e.nbytes for e in released if e.offset is not None) == len(data)
    assert counted["transfers"] == 2 and counted["bytes_sent"] == 2 * len(data)


@pytest.mark.parametrize("kind", LOOPS)
def test_options_apply_until_the_block_ends(kind, installed, make_file):
    """Nested blocks: each call reports to the innermost block's callback, none after the last."""
    path, data = make_file(3000)

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        heard = {"outer": [], "inner": []}

        async def send(n):
            await loop.sock_sendfile(client, f, 0, n)
            await read_async(peer, n)

        with client, peer, open(path, "rb") as f:
            with sendfile_options(on_release=heard["outer"].append):
                with sendfile_options(on_release=heard["inner"].append):
                    await send(100)
                await send(200)
            await send(300)
        return {name: [e.nbytes for e in events] for name, events in heard.items()}

    assert run(kind, main) == {"outer": [200], "inner": [100]}


def test_options_reject_unknown_modes():
    with pytest.raises(ValueError, match="mode must be one of"):
        with sendfile_options(mode="fast"):
            pass
    with pytest.raises(ValueError, match="mode must be one of"):
        install(mode="fast")
    with pytest.raises(TypeError):
        with sendfile_options(on_release=3):
            pass


# ---- install / uninstall ------------------------------------------------------------------------
def _methods():
    from asyncio.selector_events import BaseSelectorEventLoop
    return {(cls.__name__, name): cls.__dict__.get(name)
            for cls in (BaseSelectorEventLoop, uvloop.Loop) for name in ("sendfile", "sock_sendfile")}


def test_install_twice_is_harmless_and_uninstall_restores_exactly():
    original = _methods()
    install()
    patched = _methods()
    install(mode="copy")
    assert _methods() == patched
    assert install_statistics().mode == "copy"
    assert all(patched[key] is not original[key] for key in original)
    uninstall()
    assert _methods() == original
    assert not install_statistics().installed
    uninstall()  # a second one is harmless too
    assert _methods() == original


@pytest.mark.parametrize("kind", LOOPS)
def test_without_install_nothing_changes(kind, make_file):
    """uvloop still has no sock_sendfile; the selector loop still uses its own; nothing counted."""
    path, data = make_file(BIG)

    async def main():
        loop = asyncio.get_running_loop()
        client, peer = tcp_pair(blocking=False)
        with client, peer, open(path, "rb") as f:
            before = install_statistics()
            if kind == "uvloop":
                with pytest.raises(NotImplementedError):
                    await loop.sock_sendfile(client, f, fallback=False)
                return None, delta(before)
            sending = asyncio.ensure_future(loop.sock_sendfile(client, f, fallback=False))
            got = await read_async(peer, len(data))
            return (await sending, got), delta(before)

    result, counted = run(kind, main)
    assert counted == dict(transfers=0, bytes_sent=0, errors=0, small_writes=0, fallbacks={})
    if kind == "asyncio":
        assert result == (len(data), data)


def test_exported_from_uringsend_aio():
    for name in ("install", "uninstall", "sendfile_options", "install_statistics"):
        assert callable(getattr(uringsend.aio, name))


@pytest.mark.parametrize("args", [["--loop", "uvloop", "--install"], ["--loop", "asyncio"]])
def test_bench_aiohttp_server_script(args, tmp_path):
    """The interface the HTTP benchmark launches: 'ready <port>' once listening, files served with
    FileResponse (GET and HEAD), a clean exit on SIGTERM."""
    data = os.urandom(BIG)
    (tmp_path / "f.bin").write_bytes(data)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "AIOHTTP_NOSENDFILE"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.aiohttp_server", "--root", str(tmp_path), "--port", "0",
                             *args], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), proc.stderr.read()
        port = int(line.split()[1])
        replies = fetch(port, [("GET", "/f.bin", {}), ("HEAD", "/f.bin", {}), ("GET", "/../etc/passwd", {})])
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    (s1, _, b1), (s2, h2, b2), (s3, _, _) = replies
    assert (s1, sha(b1), s2, h2["Content-Length"], b2, s3) == (200, sha(data), 200, str(BIG), b"", 404)
    if "--install" in args:
        assert "1 transfers" in err
