"""A static-file HTTP/1.1 server on asyncio: every response's header and body leave as one
uringsend transfer.

GET and HEAD, keep-alive, Content-Length, Content-Type (from the extension), Last-Modified, one
``Range: bytes=`` range (206/416). Requests never reach outside the served directory: '..'
segments (also percent-encoded) are refused; files are opened with openat2(RESOLVE_BENEATH), so
the kernel itself refuses any step outside; where it cannot decide (no openat2, or a symlink
spelled as an absolute path), every symlink is resolved with realpath and the target must lie
inside, and the path the kernel reports for the opened fd is checked again, so a symlink swapped
in between cannot redirect the read. Bounded: request head size (431), idle and slow-client
timeouts, concurrent connections (503 beyond).
"""
import asyncio
import ctypes
import email.utils
import errno
import fcntl
import mimetypes
import os
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import urllib.parse

from .aio import AsyncRing
from .ring import MODES

MAX_HEAD = 16 << 10       # request line + header fields
MAX_FIELDS = 100
IDLE_TIMEOUT = 15.0       # waiting for (the rest of) a request head
SEND_TIMEOUT = 30.0       # a response that makes no progress
MAX_CONNECTIONS = 512

_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 416: "Range Not Satisfiable",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # NONBLOCK: a FIFO must not block
_UNSPEC = struct.pack("H14x", socket.AF_UNSPEC)  # a struct sockaddr of family AF_UNSPEC
_libc = ctypes.CDLL(None, use_errno=True)


class _Reject(Exception):
    """A request answered with an error status; ``close``: the connection cannot go on."""

    def __init__(self, status, close=False):
        self.status = status
        self.close = close


class _Beneath:
    """openat2(2) relative to a directory with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS (Linux >=
    5.6; the syscall number is the same on every architecture)."""

    SYS_OPENAT2 = 437
    RESOLVE_NO_MAGICLINKS = 0x02
    RESOLVE_BENEATH = 0x08

    class _How(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    def __init__(self, directory):
        self._syscall = _libc.syscall
        self._syscall.restype = ctypes.c_long
        self._how = self._How(_OPEN_FLAGS, 0, self.RESOLVE_BENEATH | self.RESOLVE_NO_MAGICLINKS)
        self._how_ref = ctypes.byref(self._how)
        self._how_size = ctypes.sizeof(self._how)
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.works = True  # until the kernel says ENOSYS

    def open(self, relative):
        fd = self._syscall(self.SYS_OPENAT2, self.dir_fd, relative, self._how_ref, self._how_size)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return fd

    def close(self):
        os.close(self.dir_fd)


class _Connection:
    """What the timeout sweeper needs to know about one client."""

    __slots__ = ("writer", "task", "since", "transfer", "progress")

    def __init__(self, writer, task, now):
        self.writer = writer
        self.task = task
        self.since = now        # start of the current wait (for a request, or for send progress)
        self.transfer = None    # the response being sent, if any
        self.progress = 0


class FileServer:
    """Serves the files under ``root``. Create and use it on the event loop's thread:
    ``await server.start(host, port)`` ... ``await server.aclose()``."""

    def __init__(self, root, mode="auto", *, idle_timeout=IDLE_TIMEOUT, send_timeout=SEND_TIMEOUT,
                 max_connections=MAX_CONNECTIONS, max_head=MAX_HEAD):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"{root!r} is not a directory")
        self.root = os.fsencode(os.path.realpath(root))
        self.mode = mode
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.max_head = max_head
        self.requests = 0
        self.accepted = 0
        self.refused = 0
        self._connections = {}
        self._refusing = {}     # writer -> task, for connections answered 503
        self._aring = None
        self._server = None
        self._sweeper = None
        self._date = (0, "")
        self._beneath = None

    @property
    def address(self):
        return self._server.sockets[0].getsockname()[:2]

    @property
    def port(self):
        return self.address[1]

    def statistics(self):
        """Counters of the server and of its ring."""
        return {"accepted": self.accepted, "refused": self.refused, "requests": self.requests,
                "connections": len(self._connections), "ring": self._aring.statistics()}

    async def start(self, host="127.0.0.1", port=8080):
        loop = asyncio.get_running_loop()
        self._aring = AsyncRing(1024)
        self._beneath = _Beneath(self.root)
        try:
            self._server = await asyncio.start_server(self._client, host, port, limit=self.max_head,
                                                      reuse_address=True, backlog=1024)
        except BaseException:
            await self._aring.aclose()
            self._beneath.close()
            raise
        period = max(0.05, min(self.idle_timeout, self.send_timeout) / 4)
        self._sweeper = loop.call_later(period, self._sweep, period)
        return self

    async def aclose(self):
        """Stop listening, cancel every response in flight, wait for the ring's releases."""
        if self._server is None:
            return
        self._sweeper.cancel()
        self._server.close()
        await self._server.wait_closed()
        # Handlers end on their own once their transport is gone or their transfer cancelled
        # (cancelling a stream handler's task makes asyncio 3.11 log an error for it).
        tasks = [conn.task for conn in self._connections.values()] + list(self._refusing.values())
        for conn in self._connections.values():
            if conn.transfer is not None:
                _reset(conn)
            else:
                conn.writer.transport.abort()
        for writer in self._refusing:
            writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks)
        await self._aring.aclose()
        self._beneath.close()
        self._server = None

    # ---- connections -------------------------------------------------------------------------
    async def _client(self, reader, writer):
        self.accepted += 1
        if len(self._connections) >= self.max_connections:
            await self._refuse(reader, writer)
            return
        loop = asyncio.get_running_loop()
        conn = _Connection(writer, asyncio.current_task(), loop.time())
        self._connections[writer] = conn
        sock = writer.get_extra_info("socket")  # asyncio has set TCP_NODELAY on it
        # drain() then waits until the transport has written everything: with the default limits
        # it returns while up to 64 KiB are still buffered, which a transfer would overtake.
        writer.transport.set_write_buffer_limits(0)
        try:
            while await self._exchange(reader, writer, sock, conn, loop):
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass  # the peer went away, the sweeper aborted the connection, or fds ran out
        finally:
            del self._connections[writer]
            writer.close()

    async def _refuse(self, reader, writer):
        """503, then read until the client closes (for at most a second): closing with its request
        unread would reset the connection before the client saw the answer."""
        self.refused += 1
        self._refusing[writer] = asyncio.current_task()
        writer.write(self._error_head(503, False))
        writer.write_eof()
        timer = asyncio.get_running_loop().call_later(1.0, writer.transport.abort)
        try:
            while await reader.read(1 << 16):
                pass
        except OSError:
            pass
        finally:
            timer.cancel()
            del self._refusing[writer]
            writer.close()

    async def _exchange(self, reader, writer, sock, conn, loop):
        """Read one request and answer it; False when the connection should end."""
        conn.since = loop.time()
        keep_alive = head_only = False
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise _Reject(431, close=True) from None
            self.requests += 1
            method, target, keep_alive, range_field = self._parse(head)
            head_only = method == b"HEAD"
            if not head_only and method != b"GET":
                raise _Reject(405)
            fd, st, ctype = self._open(target)
        except _Reject as exc:
            keep_alive = keep_alive and not exc.close
            writer.write(self._error_head(exc.status, keep_alive, head_only))
            await writer.drain()
            return keep_alive
        size = st.st_size
        status, start, count, extra = _range(range_field, size)
        if status == 416 or head_only or count == 0:
            os.close(fd)
            if status == 416:
                writer.write(self._error_head(416, keep_alive, head_only, f"Content-Range: bytes */{size}\r\n"))
            else:
                writer.write(self._head(status, ctype, count, st.st_mtime, extra, keep_alive))
            await writer.drain()
            return keep_alive
        head = self._head(status, ctype, count, st.st_mtime, extra, keep_alive)
        try:
            if self.mode not in ("copy", "mmap"):  # these map the file; the others read it
                fcntl.fcntl(fd, fcntl.F_SETFL, 0)  # opened O_NONBLOCK against FIFOs; reads must block
            await writer.drain()  # nothing of ours may still sit in the transport's buffer (limits 0)
            transfer = self._aring.sendfile(sock, fd, start, count, mode=self.mode, header=head)
        finally:
            os.close(fd)  # the transfer has its own duplicate
        conn.transfer = transfer
        conn.progress = None
        conn.since = loop.time()
        try:
            await transfer
        except OSError:
            return False  # reset by the peer, or cancelled by the sweeper: the response is broken
        finally:
            conn.transfer = None
        return keep_alive

    def _sweep(self, period):
        """End idle connections and responses that made no progress within the timeouts."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            for conn in list(self._connections.values()):
                try:
                    self._check(conn, now)
                except OSError:
                    conn.writer.transport.abort()  # its socket is already gone
        finally:
            self._sweeper = loop.call_later(period, self._sweep, period)

    def _check(self, conn, now):
        transfer = conn.transfer
        if transfer is None:
            if now - conn.since > self.idle_timeout:
                conn.writer.transport.abort()
            return
        # Bytes the peer acknowledged move even while one large send is still running.
        sock = conn.writer.get_extra_info("socket")
        progress = (transfer.header_sent + transfer.sent, _bytes_acked(sock))
        if progress != conn.progress:
            conn.progress = progress
            conn.since = now
        elif now - conn.since > self.send_timeout:
            _reset(conn)

    # ---- requests ----------------------------------------------------------------------------
    def _parse(self, head):
        """Request line and fields -> (method, target, keep_alive, Range field or None)."""
        lines = head.lstrip(b"\r\n").split(b"\r\n")[:-2]
        if not lines:
            raise _Reject(400, close=True)
        if len(lines) > MAX_FIELDS + 1:
            raise _Reject(431, close=True)
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _Reject(400, close=True)
        method, target, version = parts
        if version == b"HTTP/1.1":
            keep_alive = True
        elif version == b"HTTP/1.0":
            keep_alive = False
        else:
            raise _Reject(400, close=True)
        fields = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _Reject(400, close=True)
            fields[name.lower()] = value.strip()
        if b"transfer-encoding" in fields or fields.get(b"content-length", b"0") != b"0":
            raise _Reject(400, close=True)  # no request bodies: they would desynchronise the stream
        if version == b"HTTP/1.1" and b"host" not in fields:
            raise _Reject(400, close=True)
        options = {token.strip() for token in fields.get(b"connection", b"").lower().split(b",")}
        if b"close" in options:
            keep_alive = False
        elif b"keep-alive" in options:
            keep_alive = True
        return method, target, keep_alive, fields.get(b"range")

    def _open(self, target):
        """Open the regular file ``target`` names inside the root -> (fd, stat, content type)."""
        if not target.startswith(b"/"):
            raise _Reject(400, close=True)
        path = urllib.parse.unquote_to_bytes(target.partition(b"?")[0].partition(b"#")[0])
        if b"\0" in path:
            raise _Reject(400)
        parts = [p for p in path.split(b"/") if p and p != b"."]
        if b".." in parts:
            raise _Reject(403)
        fd, st, path = self._open_inside(parts)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            fd, st, path = self._open_inside(parts + [b"index.html"])
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _Reject(404)
        return fd, st, _content_type(os.path.splitext(path)[1])

    def _open_inside(self, parts):
        """Open root/parts only if it resolves to a file inside the root -> (fd, stat, path).

        openat2(RESOLVE_BENEATH) has the kernel refuse (EXDEV) any step of the resolution that
        leaves the root, race-free and in one call. What it refuses that may still be fine (a
        symlink spelled as an absolute path into the root), or every path on kernels without
        openat2, goes through realpath: every symlink resolved, the result must lie inside; then
        what the kernel actually opened is checked again, which closes the race with a symlink
        swapped in after the check.
        """
        relative = b"/".join(parts) or b"."
        if self._beneath.works:
            try:
                fd = self._beneath.open(relative)
                try:
                    return fd, os.fstat(fd), relative
                except BaseException:
                    os.close(fd)
                    raise
            except OSError as exc:
                if exc.errno == errno.ENOSYS:
                    self._beneath.works = False
                elif exc.errno != errno.EXDEV:
                    raise _Reject(_status(exc)) from None
        path = self.root
        try:
            for part in parts:
                path += b"/" + part
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    path = os.path.realpath(b"/".join([self.root] + parts))
                    if not self._inside(path):
                        raise _Reject(403)
                    break
            fd = os.open(path, _OPEN_FLAGS | os.O_NOFOLLOW)
        except OSError as exc:
            raise _Reject(_status(exc)) from None
        try:
            if not self._inside(os.readlink(b"/proc/self/fd/%d" % fd)):
                raise _Reject(403)
            return fd, os.fstat(fd), path
        except BaseException:
            os.close(fd)
            raise

    def _inside(self, real):
        root = self.root
        return real == root or (real.startswith(root) and real[len(root):len(root) + 1] == b"/")

    # ---- responses ---------------------------------------------------------------------------
    def _http_date(self):
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def _head(self, status, ctype, length, mtime, extra, keep_alive):
        return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: uringsend\r\nDate: {self._http_date()}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n"
                f"Last-Modified: {_last_modified(int(mtime))}\r\nAccept-Ranges: bytes\r\n{extra}"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()

    def _error_head(self, status, keep_alive, head_only=False, extra=""):
        body = f"{status} {_REASONS[status]}\n"
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
        return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: uringsend\r\nDate: {self._http_date()}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n{allow}{extra}"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n{'' if head_only else body}").encode()


def _range(value, size):
    """A ``Range`` field -> (status, start, count, extra header). Only one ``bytes=`` range is
    honoured; anything else is ignored (200), as RFC 9110 allows."""
    whole = (200, 0, size, "")
    if value is None or not value.startswith(b"bytes=") or b"," in value:
        return whole
    first, dash, last = value[6:].strip().partition(b"-")
    if not dash or not (first.isdigit() or (not first and last.isdigit())) or (last and not last.isdigit()):
        return whole
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return whole  # an invalid range-spec: ignore the field
        if start >= size:
            return 416, 0, 0, ""
    else:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return 416, 0, 0, ""
        start = max(0, size - suffix)
        end = size - 1
    return 206, start, end - start + 1, f"Content-Range: bytes {start}-{end}/{size}\r\n"


def _reset(conn):
    """Cancel the response in flight and reset the connection. A reset discards what the socket
    still queues, zero-copy pages included (a close would wait for the peer to read them, and the
    transfer's own duplicate of the socket keeps it open until the transfer settles anyway)."""
    _disconnect(conn.writer.get_extra_info("socket"))
    conn.transfer.cancel()
    conn.writer.transport.abort()


def _disconnect(sock):
    """connect(AF_UNSPEC): tcp_disconnect() sends a reset and purges the send queue, whoever else
    holds the socket. Best effort: a closed socket or an EBUSY from the kernel leave it be."""
    fd = sock.fileno()
    if fd >= 0:
        _libc.connect(fd, _UNSPEC, len(_UNSPEC))


def _status(exc):
    """The status for a failed lstat/open: missing -> 404; refused, or ELOOP (a symlink swapped in
    under O_NOFOLLOW) -> 403; anything else (EMFILE, EIO) is the server's own trouble -> 500."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return 404
    return 403 if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP) else 500


def _bytes_acked(sock):
    """tcp_info.tcpi_bytes_acked (Linux >= 4.1; offset 120 of struct tcp_info)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)
    return struct.unpack_from("Q", info, 120)[0] if len(info) >= 128 else 0


_types = {}


def _content_type(ext):
    ctype = _types.get(ext)
    if ctype is None:
        ctype = mimetypes.guess_type("x" + os.fsdecode(ext))[0] or "application/octet-stream"
        if ctype.startswith("text/"):
            ctype += "; charset=utf-8"
        if len(_types) < 1024:
            _types[ext] = ctype
    return ctype


_modified = {}


def _last_modified(mtime):
    value = _modified.get(mtime)
    if value is None:
        value = email.utils.formatdate(mtime, usegmt=True)
        if len(_modified) >= 4096:
            _modified.clear()
        _modified[mtime] = value
    return value


async def start_server(root, host="127.0.0.1", port=8080, mode="auto", **limits):
    """Start serving ``root`` on the running loop; returns the started ``FileServer`` (port 0
    picks a free port: see ``server.port``). ``limits``: idle_timeout, send_timeout,
    max_connections, max_head."""
    return await FileServer(root, mode, **limits).start(host, port)


# ---- command line ----------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("dir", nargs="?", metavar="DIR",
                        help="directory to serve (default: a generated demo tree in a temp dir)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--mode", choices=MODES, default="auto", help="uringsend mode (default auto)")


def run(args):
    """Serve until SIGINT or SIGTERM. Returns the exit status."""
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="uringsend-demo-") as root:
            _make_demo_tree(root)
            return _run(root, args)
    if not os.path.isdir(args.dir):
        print(f"uringsend serve: {args.dir}: not a directory", file=sys.stderr)
        return 2
    return _run(args.dir, args)


def _run(root, args):
    async def main():
        server = await start_server(root, args.host, args.port, args.mode)
        host, port = server.address
        host = f"[{host}]" if ":" in host else host
        print(f"serving {root} on http://{host}:{port}/ (mode {args.mode}); Ctrl-C stops", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.aclose()
        return server.statistics()

    try:
        stats = asyncio.run(main())
    except OSError as exc:
        print(f"uringsend serve: {exc}", file=sys.stderr)
        return 1
    print(f"stopped: {stats['requests']} requests on {stats['accepted']} connections", flush=True)
    return 0


_DEMO_FILES = (("empty.txt", 0), ("hello.txt", None), ("4k.bin", 4 << 10), ("64k.bin", 64 << 10),
               ("1m.bin", 1 << 20), ("16m.bin", 16 << 20))


def _make_demo_tree(root):
    """A few files of various sizes and an index page linking them."""
    rows = []
    for name, size in _DEMO_FILES:
        with open(os.path.join(root, name), "wb") as f:
            if size is None:
                f.write(b"Hello from uringsend: this text was sent through io_uring.\n")
            else:
                f.write(os.urandom(size))
        rows.append(f'<li><a href="{name}">{name}</a> ({os.path.getsize(os.path.join(root, name))} bytes)</li>')
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("<!doctype html>\n<title>uringsend demo</title>\n<h1>uringsend demo files</h1>\n<ul>\n"
                + "\n".join(rows) + "\n</ul>\n")
