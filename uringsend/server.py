"""A static-file HTTP/1.1 server on asyncio: every response's header and body leave as one
uringsend transfer.

GET and HEAD, keep-alive and pipelining, Content-Length, Content-Type (from the extension),
Last-Modified and a strong ETag, conditional requests (If-Match, If-Unmodified-Since -> 412;
If-None-Match, If-Modified-Since -> 304), one ``Range: bytes=`` range (206/416) guarded by
If-Range, origin-form and absolute-form request targets. Requests are parsed by llhttp (the
``httptools`` binding); each connection is an ``asyncio.Protocol``, so a response whose transfer
completes while it starts (small files) costs no task, future or extra loop iteration.

Requests never reach outside the served directory: '..' segments (also percent-encoded) are
refused; files are opened with openat2(RESOLVE_BENEATH), so the kernel itself refuses any step
outside; where it cannot decide (no openat2, or a symlink spelled as an absolute path), every
symlink is resolved with realpath and the target must lie inside, and the path the kernel reports
for the opened fd is checked again, so a symlink swapped in between cannot redirect the read.
Bounded: request head size and field count (431), pipelined requests held per connection, idle
and slow-client timeouts, concurrent connections (503 beyond).
"""
import asyncio
import calendar
import collections
import ctypes
import email.utils
import errno
import fcntl
import mimetypes
import os
import re
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import urllib.parse

import httptools

from .aio import AsyncRing
from .ring import MODES

MAX_HEAD = 16 << 10       # request line + header fields
MAX_FIELDS = 100
IDLE_TIMEOUT = 15.0       # waiting for (the rest of) a request head
SEND_TIMEOUT = 30.0       # a response that makes no progress
MAX_CONNECTIONS = 512
MAX_PIPELINED = 64        # parsed requests held per connection before it stops reading
OPEN_FILES = 64           # files kept open for the next request that names them

_REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 412: "Precondition Failed",
            416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # NONBLOCK: a FIFO must not block
_UNSPEC = struct.pack("H14x", socket.AF_UNSPEC)  # a struct sockaddr of family AF_UNSPEC
_libc = ctypes.CDLL(None, use_errno=True)
# The request fields the server acts on; the others are counted against the limits and dropped.
_FIELDS = frozenset((b"host", b"connection", b"content-length", b"transfer-encoding", b"range",
                     b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since",
                     b"if-range"))
_LISTS = frozenset((b"connection", b"if-match", b"if-none-match"))  # repeated lines join with ", "
_CONDITIONS = frozenset((b"range", b"if-match", b"if-none-match", b"if-modified-since",
                         b"if-unmodified-since", b"if-range"))
_ENTITY_TAG = re.compile(rb'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


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


class _OpenFile:
    """A file kept open for the request path that named it; ``path``: what that path resolved to
    (the directory's index.html for a directory), relative to the root."""

    __slots__ = ("fd", "identity", "ctype", "path", "head", "head_key")

    def __init__(self, fd, st, ctype, path):
        self.fd = fd
        self.identity = (st.st_ino, st.st_dev, st.st_mode, st.st_uid, st.st_gid)
        self.ctype = ctype
        self.path = path
        self.head = None        # the last 200 head built for this file, and what it depends on
        self.head_key = None


class _Request:
    """One parsed request head."""

    __slots__ = ("method", "target", "keep_alive", "fields", "plain", "error")

    def __init__(self, method, target, keep_alive, fields, plain=True, error=None):
        self.method = method
        self.target = target
        self.keep_alive = keep_alive
        self.fields = fields
        self.plain = plain      # no range and no condition: the whole file
        self.error = error      # a _Reject found while parsing: answered in turn, then the end


class _Connection(asyncio.Protocol):
    """One client: llhttp parses what arrives into requests, answered one at a time in order.

    A response goes out either through the transport (error, HEAD, 304 and empty answers) or as
    a uringsend transfer on the socket itself; a transfer starts only once the transport has
    written everything before it (write buffer limits 0: pause_writing/resume_writing say so).
    """

    def __init__(self, server):
        self.server = server
        self.transport = None
        self.sock = None          # our duplicate of the socket, a socket.socket for the ring
        self.parser = httptools.HttpRequestParser(self)
        self.queue = collections.deque()
        self.transfer = None      # the response being sent, if any
        self.progress = None
        self.since = 0.0          # start of the current wait (for a request, or for send progress)
        self.writing_paused = False
        self.reading_paused = False
        self.ended = False        # nothing more is parsed: a request asked to close, or a bad one
        self.eof = False
        self.refused = False
        # the request being parsed
        self._in_head = False
        self._head = 0            # bytes of its head's completed parts (target, fields)
        self._spill = 0           # bytes received after its first chunk, while it was incomplete
        self._fields = 0
        self._target = b""
        self._wanted = None
        self._plain = True
        self._request = None

    # ---- transport events --------------------------------------------------------------------
    def connection_made(self, transport):
        server = self.server
        self.transport = transport
        server.accepted += 1
        server._connections.add(self)
        self.since = server._loop.time()
        if len(server._connections) - server._refusing > server.max_connections:
            self._refuse()
            return
        # drain-free ordering: the transport reports any byte it could not write at once
        transport.set_write_buffer_limits(0)
        sock = transport.get_extra_info("socket")  # asyncio has set TCP_NODELAY on it
        try:
            self.sock = socket.socket(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
        except OSError:
            transport.abort()  # out of fds

    def connection_lost(self, exc):
        server = self.server
        if self.refused:
            server._refusing -= 1
            self._timer.cancel()
        server._connections.discard(self)
        self.transport = None
        self.queue.clear()
        if self.sock is not None:
            self.sock.close()  # a transfer in flight holds the socket on its own
            self.sock = None
        if not server._connections and server._all_gone is not None and not server._all_gone.done():
            server._all_gone.set_result(None)

    def data_received(self, data):
        if self.ended:
            return  # read and dropped until the answer so far is out and the connection closes
        if not self._in_head and data[:4] == b"\r\n\r\n":
            self._fail(_Reject(400, close=True))  # one empty line before a request is tolerated
            self._run()
            return
        if self._in_head:
            self._spill += len(data)  # all of it continues this head, or this head ends in it
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.ended:  # llhttp refuses what follows a request that closes: not an error
                reject = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
                self._fail(reject if isinstance(reject, _Reject) else _Reject(400, close=True))
            self._run()
            return
        except httptools.HttpParserUpgrade:
            self.ended = True  # answered without switching protocols (the request has close set)
        if self._in_head and self._spill > self.server.max_head:
            self._fail(_Reject(431, close=True))  # a field that does not end: llhttp would keep it all
        if len(self.queue) >= MAX_PIPELINED and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._run()

    def eof_received(self):
        if self.refused:
            return False  # the 503 is out: close
        self.eof = True
        self._run()
        return True  # keep the transport open for the answers still to come

    def pause_writing(self):
        self.writing_paused = True

    def resume_writing(self):
        self.writing_paused = False
        self._run()

    # ---- llhttp callbacks --------------------------------------------------------------------
    def on_message_begin(self):
        self._in_head = True
        self._head = 0
        self._spill = 0
        self._fields = 0
        self._target = b""
        self._wanted = {}
        self._plain = True

    def on_url(self, url):
        self._target += url
        self._head += len(url)
        if self._head > self.server.max_head:
            raise _Reject(431, close=True)

    def on_header(self, name, value):
        self._head += len(name) + len(value) + 4
        self._fields += 1
        if self._head > self.server.max_head or self._fields > MAX_FIELDS:
            raise _Reject(431, close=True)
        name = name.lower()
        if name in _FIELDS:
            if name in _CONDITIONS:
                self._plain = False
            wanted = self._wanted
            if name in wanted:
                if name not in _LISTS:
                    raise _Reject(400, close=True)  # two Host, Range, ... fields: ambiguous
                value = wanted[name] + b", " + value
            wanted[name] = value

    def on_headers_complete(self):
        self._in_head = False
        parser = self.parser
        wanted = self._wanted
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(400, close=True)
        if b"transfer-encoding" in wanted or wanted.get(b"content-length", b"0") != b"0":
            raise _Reject(400, close=True)  # no request bodies: they would desynchronise the stream
        if version == "1.1" and b"host" not in wanted:
            raise _Reject(400, close=True)
        keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        self._request = _Request(parser.get_method(), self._target, keep_alive, wanted, self._plain)

    def on_message_complete(self):
        request = self._request
        self.server.requests += 1
        self.queue.append(request)
        if not request.keep_alive:
            self.ended = True  # what follows a request that closes the connection is not read

    # ---- answering ---------------------------------------------------------------------------
    def _fail(self, reject):
        """A request that cannot be parsed: answered after those before it, then the end."""
        self.server.requests += 1
        self.ended = True
        self._in_head = False
        self.queue.append(_Request(None, None, False, None, error=reject))

    def _run(self):
        """Answer queued requests while nothing is in flight and the transport's buffer is empty."""
        queue = self.queue
        server = self.server
        while queue and self.transfer is None and not self.writing_paused and self.transport is not None:
            request = queue.popleft()
            if not server._answer(self, request):
                self.transport.close()
                return
            if self.transfer is None:
                self.since = server._loop.time()
        if self.transport is None or self.transfer is not None:
            return
        if self.reading_paused and len(queue) < MAX_PIPELINED // 2:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.eof and not queue and not self.writing_paused:
            self.transport.close()

    def _started(self, transfer, keep_alive):
        """A transfer that did not finish while starting: wait for it in a task."""
        self.transfer = transfer
        self.progress = None
        self.since = self.server._loop.time()
        task = self.server._loop.create_task(self._finish(transfer, keep_alive))
        self.server._inflight[task] = transfer

    async def _finish(self, transfer, keep_alive):
        try:
            await transfer
        except OSError:
            keep_alive = False  # reset by the peer, or cancelled by the sweeper: the response is broken
            if self.transport is not None:
                self.transport.abort()
        finally:
            self.transfer = None
            del self.server._inflight[asyncio.current_task()]
        if self.transport is None:
            return
        if not keep_alive:
            self.transport.close()
            return
        self.since = self.server._loop.time()
        self._run()

    def _refuse(self):
        """503, then read until the client closes (for at most a second): closing with its request
        unread would reset the connection before the client saw the answer."""
        server = self.server
        server.refused += 1
        server._refusing += 1
        self.refused = self.ended = True
        self.transport.write(server._error_head(503, False))
        self.transport.write_eof()
        self._timer = server._loop.call_later(1.0, self.transport.abort)


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
        self._blocking_reads = mode not in ("copy", "mmap")  # these map the file; the others read it
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.max_head = max_head
        self.requests = 0
        self.accepted = 0
        self.refused = 0
        self._connections = set()
        self._refusing = 0      # of those, connections answered 503
        self._all_gone = None   # resolved when the last connection is lost (aclose)
        self._inflight = {}     # task -> the transfer it waits for (also of connections lost since)
        self._files = {}        # request path -> _OpenFile, oldest first
        self._loop = None
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
                "connections": len(self._connections) - self._refusing, "open_files": len(self._files),
                "ring": self._aring.statistics()}

    async def start(self, host="127.0.0.1", port=8080):
        self._loop = loop = asyncio.get_running_loop()
        self._aring = AsyncRing(1024)
        self._beneath = _Beneath(self.root)
        try:
            self._server = await loop.create_server(lambda: _Connection(self), host, port,
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
        tasks = list(self._inflight)
        if self._connections:
            self._all_gone = self._loop.create_future()
        for conn in list(self._connections):
            if conn.transfer is not None:
                _reset(conn)
            else:
                conn.transport.abort()
        for transfer in self._inflight.values():
            transfer.cancel()  # responses whose connection is gone already
        if tasks:
            await asyncio.wait(tasks)
        if self._all_gone is not None:
            await self._all_gone
        await self._server.wait_closed()
        await self._aring.aclose()
        for entry in self._files.values():
            os.close(entry.fd)
        self._files.clear()
        self._beneath.close()
        self._server = None

    def _sweep(self, period):
        """End idle connections and responses that made no progress within the timeouts."""
        now = self._loop.time()
        try:
            for conn in list(self._connections):
                if conn.refused or conn.transport is None:
                    continue  # a refused connection has its own timer
                try:
                    self._check(conn, now)
                except OSError:
                    conn.transport.abort()  # its socket is already gone
        finally:
            self._sweeper = self._loop.call_later(period, self._sweep, period)

    def _check(self, conn, now):
        transfer = conn.transfer
        if transfer is None:
            if now - conn.since > self.idle_timeout:
                conn.transport.abort()
            return
        # Bytes the peer acknowledged move even while one large send is still running.
        progress = (transfer.header_sent + transfer.sent, _bytes_acked(conn.sock))
        if progress != conn.progress:
            conn.progress = progress
            conn.since = now
        elif now - conn.since > self.send_timeout:
            _reset(conn)

    # ---- requests ----------------------------------------------------------------------------
    def _answer(self, conn, request):
        """Answer one request (an error, a head alone, or a transfer started for the connection).
        False when the connection ends after it."""
        transport = conn.transport
        keep_alive = request.keep_alive
        method = request.method
        head_only = method == b"HEAD"
        try:
            if request.error is not None:
                raise request.error
            if not head_only and method != b"GET":
                raise _Reject(405)
            entry, st = self._open(request.target)  # entry.fd belongs to the open-file cache
        except _Reject as exc:
            keep_alive = keep_alive and not exc.close
            transport.write(self._error_head(exc.status, keep_alive, head_only))
            return keep_alive
        try:
            size = st.st_size
            if request.plain:  # the common case: the whole file, its head reused within a second
                start, count = 0, size
                key = (st.st_mtime_ns, size, keep_alive, self._http_date())
                if entry.head_key != key:
                    entry.head = self._head(200, entry.ctype, size, st, "", keep_alive)
                    entry.head_key = key
                head = entry.head
            else:
                mtime = int(st.st_mtime)
                etag = _etag(st)
                fields = request.fields
                status = _precondition(fields, etag, mtime)
                if status is None:
                    if b"range" in fields and not head_only and _if_range(fields.get(b"if-range"), etag, mtime):
                        status, start, count, extra = _range(fields[b"range"], size)
                    else:
                        status, start, count, extra = 200, 0, size, ""
                if status == 304:
                    transport.write(self._not_modified(etag, keep_alive))
                    return keep_alive
                if status == 412 or status == 416:
                    extra = f"Content-Range: bytes */{size}\r\n" if status == 416 else ""
                    transport.write(self._error_head(status, keep_alive, head_only, extra))
                    return keep_alive
                head = self._head(status, entry.ctype, count, st, extra, keep_alive)
            if head_only or count == 0:
                transport.write(head)
                return keep_alive
            transfer = self._aring.sendfile(conn.sock, entry.fd, start, count, mode=self.mode, headers=head)
        except OSError:  # not started (out of fds or memory): nothing of it was sent
            transport.write(self._error_head(500, False, head_only))
            return False
        if not transfer.done():
            conn._started(transfer, keep_alive)
            return True
        if transfer.error is not None:
            return False  # the peer went away: the response is broken
        return keep_alive

    def _open(self, target):
        """The regular file ``target`` names inside the root -> (_OpenFile, stat); its fd belongs
        to the open-file cache (a transfer holds the file on its own).
        ``target``: origin-form (``/path?query``) or absolute-form (``http://host/path``; the
        host is not looked at: every name serves the same directory).

        A path served before is looked up with one stat instead of an open: when it still names
        the very file kept open (same device and inode, same mode and owner), that fd serves. A
        stat cannot open or read anything, and a path that now leads elsewhere (renamed over,
        deleted, a symlink retargeted, even outside) finds another inode and goes through the
        full open below, containment checks and all."""
        if target[:1] == b"/":
            path = target.partition(b"?")[0]
            if b"#" in path:
                path = path.partition(b"#")[0]
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            try:
                url = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                raise _Reject(400, close=True) from None
            if not url.host:
                raise _Reject(400, close=True)
            path = url.path or b"/"
        else:
            raise _Reject(400, close=True)
        files = self._files
        entry = files.get(path)  # keyed by the path as requested: it always decodes the same
        if entry is not None:
            try:
                st = os.stat(entry.path, dir_fd=self._beneath.dir_fd)
            except OSError:
                st = None
            if st is not None and (st.st_ino, st.st_dev, st.st_mode, st.st_uid, st.st_gid) == entry.identity:
                return entry, st
            del files[path]
            os.close(entry.fd)
        key = path
        if b"%" in path:
            path = urllib.parse.unquote_to_bytes(path)
        if b"\0" in path:
            raise _Reject(400)
        parts = [p for p in path.split(b"/") if p and p != b"."]
        if b".." in parts:
            raise _Reject(403)
        fd, st, path = self._open_inside(parts)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            parts = parts + [b"index.html"]
            fd, st, path = self._open_inside(parts)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _Reject(404)
        name = path.rpartition(b"/")[2]
        dot = name.rfind(b".")
        ctype = _content_type(name[dot:] if dot > 0 else b"")
        if self._blocking_reads:
            fcntl.fcntl(fd, fcntl.F_SETFL, 0)  # opened O_NONBLOCK against FIFOs; reads must block
        if len(files) >= OPEN_FILES:
            os.close(files.pop(next(iter(files))).fd)  # the oldest
        entry = files[key] = _OpenFile(fd, st, ctype, b"/".join(parts))
        return entry, st

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

    def _head(self, status, ctype, length, st, extra, keep_alive):
        return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: uringsend\r\nDate: {self._http_date()}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n"
                f"Last-Modified: {_last_modified(int(st.st_mtime))}\r\nETag: {_etag(st)}\r\n"
                f"Accept-Ranges: bytes\r\n{extra}Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()

    def _not_modified(self, etag, keep_alive):
        """304: no body, no representation fields; the validator the cache compares."""
        return (f"HTTP/1.1 304 Not Modified\r\nServer: uringsend\r\nDate: {self._http_date()}\r\nETag: {etag}\r\n"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()

    def _error_head(self, status, keep_alive, head_only=False, extra=""):
        body = f"{status} {_REASONS[status]}\n"
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
        return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: uringsend\r\nDate: {self._http_date()}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n{allow}{extra}"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n{'' if head_only else body}").encode()


# ---- conditional requests (RFC 9110, section 13) ---------------------------------------------
def _etag(st):
    """A strong entity-tag: the inode, the modification time in nanoseconds, the size."""
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


def _precondition(fields, etag, mtime):
    """The status the preconditions decide (412, 304), or None to go on. Evaluated in the order of
    RFC 9110 13.2.2; a date field is ignored when its entity-tag counterpart is present or when
    it is not a valid HTTP-date. The method is GET or HEAD here."""
    value = fields.get(b"if-match")
    if value is not None:
        if not _tag_matches(value, etag, strong=True):
            return 412
    else:
        value = fields.get(b"if-unmodified-since")
        if value is not None:
            date = _http_date(value)
            if date is not None and mtime > date:
                return 412
    value = fields.get(b"if-none-match")
    if value is not None:
        return 304 if _tag_matches(value, etag, strong=False) else None
    value = fields.get(b"if-modified-since")
    if value is not None:
        date = _http_date(value)
        if date is not None and mtime <= date:
            return 304
    return None


def _tag_matches(value, etag, strong):
    """Whether the field value (``*`` or a list of entity-tags) matches ``etag``. Weak comparison
    ignores ``W/``; strong comparison never matches a weak tag. A malformed list matches nothing."""
    value = value.strip()
    if value == b"*":
        return True
    wanted = etag.encode()
    pos, end = 0, len(value)
    matched = False
    while pos < end:
        m = _ENTITY_TAG.match(value, pos)
        if m is None or m.end() == pos:
            return False
        if m.group(2) == wanted and not (strong and m.group(1)):
            matched = True
        pos = m.end()
    return matched


def _if_range(value, etag, mtime):
    """Whether a Range field applies (RFC 9110 13.1.5): no If-Range, or one that names the current
    representation: its strong entity-tag, or exactly its Last-Modified date when that date is a
    strong validator (at least a second old)."""
    if value is None:
        return True
    value = value.strip()
    if value[:1] == b'"' or value[:2] == b"W/":
        return value == etag.encode()
    date = _http_date(value)
    return date is not None and date == mtime and mtime < int(time.time())


def _http_date(value):
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime form) -> seconds since the epoch, or None."""
    try:
        parts = email.utils.parsedate_tz(value.decode("latin-1"))
        if parts is None:
            return None
        return calendar.timegm(parts[:9]) - (parts[9] or 0)
    except (ValueError, TypeError, OverflowError, IndexError):
        return None


def _range(value, size):
    """A ``Range`` field -> (status, start, count, extra header). Only one ``bytes=`` range is
    honoured; anything else is ignored (200), as RFC 9110 allows."""
    whole = (200, 0, size, "")
    if not value.startswith(b"bytes=") or b"," in value:
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
    transfer's own hold on the socket keeps it open until the transfer settles anyway)."""
    _disconnect(conn.sock)
    conn.transfer.cancel()
    conn.transport.abort()


def _disconnect(sock):
    """connect(AF_UNSPEC): tcp_disconnect() sends a reset and purges the send queue, whoever else
    holds the socket. Best effort: a closed socket or an EBUSY from the kernel leave it be."""
    fd = sock.fileno() if sock is not None else -1
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
