"""``uringsend.aio.install()``: ``loop.sendfile()`` and ``loop.sock_sendfile()`` through io_uring on
asyncio's selector loop and on uvloop, for servers that already call them (aiohttp's FileResponse).

What is replaced, per loop class (``uninstall()`` puts back exactly what was in each class's
``__dict__``):

- asyncio's selector loop: ``sock_sendfile``. Its own ``sendfile(transport, ...)`` stays: it pauses
  reading, waits until the transport's write buffer is empty, and calls ``self.sock_sendfile(...,
  fallback=False)``, which is now ours; on SendfileNotAvailableError it runs its own read+write
  fallback. ``sendfile`` is wrapped only to count transports it never hands to ``sock_sendfile``
  (TLS).
- uvloop: both methods (uvloop has neither: they raise NotImplementedError, and aiohttp then reads
  the file in Python). The transport path does what the selector loop does, through the transport's
  public interface: pause reading, wait until the write buffer is empty, send, restore.

Parameter checks and their errors are the stdlib's. What io_uring cannot send (a TLS transport, a
file that is not a regular file, io_uring unavailable) goes to the method that was there before,
so the loop behaves as it did without install() (uvloop: NotImplementedError); with
``fallback=False`` uvloop raises SendfileNotAvailableError, as the stdlib documents. Every such
case is counted by reason in ``install_statistics()``. In mode 'auto' a range of at most SMALL
bytes is read and written by the loop's thread instead: below that a ring round trip costs more.

One AsyncRing per loop, made on the first transfer from that loop's thread and closed by the
loop's ``close()`` (hooked on the loop instance when the ring is made): transfers still running
are cancelled and the ring is driven until the kernel released everything they used.
"""
import asyncio
import contextvars
import dataclasses
import io
import os
import socket
import stat
import threading
import time
import types
from typing import Mapping

from .errors import IoUringUnavailable
from .ring import MODES
from .transfer import RELEASED, Event

TLS = "TLS transport"
NO_STREAM_SOCKET = "transport without a stream socket"
NOT_REGULAR = "not a regular file"
UNAVAILABLE = "io_uring unavailable"
# In mode 'auto', a range up to this size is read and written by the loop's thread: below it
# that costs less CPU than a ring round trip (docs/asyncio.md has the measurements). 64 KiB is
# also a transport's default high-water mark, and a read that size is a small allocation.
SMALL = 64 << 10

_MISSING = object()
try:
    from ssl import SSLSocket as _SSLSocket
except ImportError:  # Python built without ssl: no SSLSocket can exist
    _SSLSocket = ()
_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
_lock = threading.Lock()
_patched = []             # (class, name, what its __dict__ held or _MISSING), in patch order
_default = {"mode": "auto"}
_rings = {}               # loop -> AsyncRing, until the loop closes
_unavailable = []         # why io_uring cannot be used in this process (IoUringUnavailable text)
_counts = {"transfers": 0, "bytes_sent": 0, "errors": 0, "small_writes": 0, "small_bytes": 0}
_fallbacks = {}
_scope = contextvars.ContextVar("uringsend.aio.sendfile_options", default=None)


@dataclasses.dataclass(frozen=True)
class InstallStatistics:
    installed: bool               # install() is in effect
    mode: str                     # the default mode given to install()
    transfers: int                # sendfile calls that went through io_uring
    bytes_sent: int               # file bytes those transfers sent
    errors: int                   # io_uring transfers that ended with an error (or were cancelled)
    small_writes: int             # mode 'auto', small ranges: read and written by the loop's thread
    small_bytes: int              # bytes those writes sent
    fallbacks: Mapping[str, int]  # calls handed to the loop's previous method, by reason
    rings: int                    # rings open now (one per loop that sent a file)


def install_statistics():
    """Counts since the process started (across install()/uninstall()), as a frozen record."""
    with _lock:
        return InstallStatistics(bool(_patched), _default["mode"], _counts["transfers"],
                                 _counts["bytes_sent"], _counts["errors"], _counts["small_writes"],
                                 _counts["small_bytes"],
                                 types.MappingProxyType(dict(_fallbacks)), len(_rings))


class SendfileScope:
    """What ``sendfile_options()`` returns: the options, and the transfers started under them."""

    def __init__(self, mode, on_release):
        self.mode = mode
        self.on_release = on_release
        self.transfers = []   # AsyncTransfer handles of the io_uring transfers, in the order started
        self._token = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _scope.reset(self._token)

    async def released(self):
        """Wait until the kernel released every buffer or page of every transfer started under
        these options (mode 'splice' reports none: ReleaseNotReported)."""
        for handle in list(self.transfers):
            await handle.released()


def sendfile_options(*, mode=None, on_release=None):
    """Options for the ``loop.sendfile()``/``loop.sock_sendfile()`` calls made from now on in this
    task's context (and in tasks it creates): ``mode`` (default: install()'s) and
    ``on_release(event)``, called on the loop for each released chunk. Returns a SendfileScope.
    In a ``with`` block they end with the block; otherwise with the task (aiohttp runs each
    request in a task of its own, up to and including the response's ``prepare()``)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if on_release is not None and not callable(on_release):
        raise TypeError("on_release must be callable")
    scope = SendfileScope(mode, on_release)
    scope._token = _scope.set(scope)
    return scope


def install(*, mode="auto"):
    """Send files through io_uring from ``loop.sendfile()`` and ``loop.sock_sendfile()`` on
    asyncio's selector loop and, when it is importable, uvloop. ``mode``: the default transfer
    mode (``sendfile_options`` overrides it per block). Calling it again only changes the mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    _default["mode"] = mode
    if _patched:
        return
    from asyncio.selector_events import BaseSelectorEventLoop
    _patch(BaseSelectorEventLoop, "sock_sendfile", _sock_sendfile_method(native=True))
    _patch(BaseSelectorEventLoop, "sendfile", _counting_sendfile_method())
    try:
        import uvloop
    except ImportError:
        return
    import uvloop.loop
    _patch(uvloop.Loop, "sock_sendfile", _sock_sendfile_method(native=False))
    _patch(uvloop.Loop, "sendfile", _uvloop_sendfile_method(
        (uvloop.loop.TCPTransport, uvloop.loop.UnixTransport)))


def uninstall():
    """Put back what install() replaced. Rings already made stay until their loops close."""
    while _patched:
        cls, name, previous = _patched.pop()
        if previous is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, previous)
    _default["mode"] = "auto"


def _patch(cls, name, make):
    _patched.append((cls, name, cls.__dict__.get(name, _MISSING)))
    setattr(cls, name, make(getattr(cls, name)))


# ---- the replacements -----------------------------------------------------------------------
def _sock_sendfile_method(native):
    """loop.sock_sendfile. ``native``: the previous method has a native path and a fallback of its
    own (the selector loop); otherwise it raises NotImplementedError (uvloop)."""
    def make(previous):
        async def sock_sendfile(self, sock, file, offset=0, count=None, *, fallback=True):
            if self.get_debug() and sock.gettimeout() != 0:
                raise ValueError("the socket must be non-blocking")
            _check_params(sock, file, offset, count)
            plan = _plan(self, file, offset, count)
            if plan is _NOTHING:
                return 0
            if type(plan) is not str:
                if plan.ring is not None:
                    # a socket object spares the ring an fstat (uvloop's stand-in is not one)
                    return await _send(plan, sock if type(sock) is socket.socket else sock.fileno(),
                                       file, offset)
                data = _read_small(plan, offset)
                if type(data) is not str:
                    if data:
                        await self.sock_sendall(sock, data)
                    return _written_small(plan, file, offset, len(data))
                plan = data
            _fallback(plan)
            if not native and not fallback:
                raise asyncio.SendfileNotAvailableError(
                    f"sendfile through io_uring is not available for socket {sock!r} and file "
                    f"{file!r}: {plan}")
            return await previous(self, sock, file, offset, count, fallback=fallback)
        sock_sendfile.__doc__ = previous.__doc__
        return sock_sendfile
    return make


def _counting_sendfile_method():
    """The selector loop's own loop.sendfile, counting the transports it sends without
    sock_sendfile (its read+write fallback)."""
    def make(previous):
        async def sendfile(self, transport, file, offset=0, count=None, *, fallback=True):
            if _transport_reason(transport) == TLS and not transport.is_closing():
                _fallback(TLS)
            return await previous(self, transport, file, offset, count, fallback=fallback)
        sendfile.__doc__ = previous.__doc__
        return sendfile
    return make


def _uvloop_sendfile_method(stream_transports):
    def make(previous):
        async def sendfile(self, transport, file, offset=0, count=None, *, fallback=True):
            if transport.is_closing():
                raise RuntimeError("Transport is closing")
            if type(transport) in stream_transports:  # uvloop's TCP and UNIX stream transports
                sock = transport.get_extra_info("socket")
                reason = None if sock.family in _FAMILIES else NO_STREAM_SOCKET
            else:
                reason = _transport_reason(transport) or NO_STREAM_SOCKET
            if reason is None:
                _check_params(sock, file, offset, count)
                plan = _plan(self, file, offset, count)
                if plan is _NOTHING:
                    return 0
                if type(plan) is str:
                    reason = plan
                elif plan.ring is not None:
                    return await _send_on_transport(self, transport, plan, sock.fileno(), file, offset)
                else:
                    data = _read_small(plan, offset)
                    if type(data) is not str:
                        transport.write(data)  # in order after what is buffered already
                        return _written_small(plan, file, offset, len(data))
                    reason = data
            _fallback(reason)
            if not fallback:
                raise asyncio.SendfileNotAvailableError(
                    f"sendfile through io_uring is not available for transport {transport!r}: {reason}")
            return await previous(self, transport, file, offset, count, fallback=fallback)
        sendfile.__doc__ = previous.__doc__
        return sendfile
    return make


# ---- checks -----------------------------------------------------------------------------------
def _check_params(sock, file, offset, count):
    """The stdlib's checks for sock_sendfile, with its errors."""
    if isinstance(sock, _SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")
    if "b" not in getattr(file, "mode", "b"):
        raise ValueError("file should be opened in binary mode")
    if sock.type != socket.SOCK_STREAM:
        raise ValueError("only SOCK_STREAM type sockets are supported")
    if count is not None:
        if not isinstance(count, int):
            raise TypeError(f"count must be a positive integer (got {count!r})")
        if count <= 0:
            raise ValueError(f"count must be a positive integer (got {count!r})")
    if not isinstance(offset, int):
        raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
    if offset < 0:
        raise ValueError(f"offset must be a non-negative integer (got {offset!r})")


def _transport_reason(transport):
    """Why a transport cannot be sent to through its socket, or None."""
    if transport.get_extra_info("sslcontext") is not None:
        return TLS
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM or sock.family not in _FAMILIES:
        return NO_STREAM_SOCKET
    return None


class _Plan:
    """One call's send: the file's fd, the bytes to send, the mode and options, and the ring
    (None: a small file in mode 'auto', read and written by the loop's thread)."""

    __slots__ = ("fd", "n", "mode", "scope", "ring")

    def __init__(self, fd, n, mode, scope, ring):
        self.fd, self.n, self.mode, self.scope, self.ring = fd, n, mode, scope, ring


_NOTHING = _Plan(-1, 0, None, None, None)


def _plan(loop, file, offset, count):
    """How to send ``count`` bytes (None: to the end) of ``file`` from ``offset``: a _Plan,
    _NOTHING (at or past the end: the stdlib sends nothing and leaves the position alone), or
    the reason to fall back (a str)."""
    try:
        fd = file.fileno()
    except (AttributeError, io.UnsupportedOperation):  # a closed file raises ValueError, as with the stdlib
        return NOT_REGULAR
    scope = _scope.get()
    mode = _default["mode"] if scope is None or scope.mode is None else scope.mode
    if mode == "auto" and count is not None and count <= SMALL:
        return _Plan(fd, count, mode, scope, None)  # _read_small checks the file
    try:
        st = os.fstat(fd)
    except OSError:
        return NOT_REGULAR
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR
    n = st.st_size - offset if count is None else min(count, st.st_size - offset)
    if n <= 0:
        return _NOTHING
    if mode == "auto" and n <= SMALL:
        return _Plan(fd, n, mode, scope, None)
    ring = _rings.get(loop)
    if ring is None or ring.closed:
        ring = _ring_for(loop)
        if ring is None:
            return UNAVAILABLE
    return _Plan(fd, n, mode, scope, ring)


def _ring_for(loop):
    """The loop's ring, made now; None where io_uring cannot be used."""
    from .aio import AsyncRing
    if _unavailable:
        return None
    try:
        ring = AsyncRing(1024)
    except IoUringUnavailable as exc:
        _unavailable.append(str(exc))  # the kernel or a seccomp filter refuses: for good
        return None
    except OSError:
        return None  # EMFILE, ENOMEM: this call falls back, the next one tries again
    _rings[loop] = ring
    _close_with(loop)
    return ring


def _close_with(loop):
    """Have ``loop.close()`` close the loop's ring first (while the loop can still remove the
    ring's reader), then do what it did before."""
    close = loop.close

    def close_ring_then_loop():
        if loop.is_running() or loop.is_closed():
            return close()  # refused, or nothing left to do: the ring goes at the real close
        loop.__dict__.pop("close", None)
        ring = _rings.pop(loop, None)
        try:
            if ring is not None:
                ring.close()
        finally:
            close()

    loop.close = close_ring_then_loop


# ---- sending ---------------------------------------------------------------------------------
def _fallback(reason):
    with _lock:
        _fallbacks[reason] = _fallbacks.get(reason, 0) + 1


def _read_small(plan, offset):
    """A small range's bytes, read by the loop's thread (from the page cache, as the stdlib's
    native sendfile also reads on the loop's thread), or the reason to fall back (a str): only a
    regular file has both a position to read at and an end (pread fails or reads nothing else).
    Nothing was sent when it falls back."""
    try:
        return os.pread(plan.fd, plan.n, offset)
    except OSError:  # ESPIPE (pipe, socket, tty), EISDIR, EINVAL, ...
        return NOT_REGULAR


def _written_small(plan, file, offset, n):
    """After a small file's bytes were written: the socket copied them, so they are released."""
    if not n:
        return 0  # at or past the end: nothing sent, the position left alone
    with _lock:
        _counts["small_writes"] += 1
        _counts["small_bytes"] += n
    _seek(file, offset, n)
    if plan.scope is not None and plan.scope.on_release is not None:
        plan.scope.on_release(Event(RELEASED, offset, n, True, time.perf_counter_ns()))
    return n


async def _send(plan, sock, file, offset):
    """Send through the loop's ring; the file position ends at offset + bytes sent, as with the
    stdlib, also on error and cancellation."""
    scope = plan.scope
    handle = plan.ring.sendfile(sock, plan.fd, offset, plan.n, mode=plan.mode,
                                on_release=None if scope is None else scope.on_release)
    if scope is not None:
        scope.transfers.append(handle)
    try:
        sent = await handle
    except BaseException:
        with _lock:
            _counts["transfers"] += 1
            _counts["errors"] += 1
            _counts["bytes_sent"] += handle.transfer.sent
        _seek(file, offset, handle.transfer.sent)
        raise
    with _lock:
        _counts["transfers"] += 1
        _counts["bytes_sent"] += sent
    _seek(file, offset, sent)
    return sent


def _seek(file, offset, sent):
    if sent > 0 and hasattr(file, "seek"):
        file.seek(offset + sent)


async def _send_on_transport(loop, transport, plan, sock_fd, file, offset):
    """What the selector loop does around a native send, through the transport's public methods:
    reading paused, every byte already written to the transport out first, then the file."""
    resume_reading = transport.is_reading()
    transport.pause_reading()
    try:
        if transport.get_write_buffer_size():
            await _drained(loop, transport)
        return await _send(plan, sock_fd, file, offset)
    finally:
        if resume_reading and not transport.is_closing():
            transport.resume_reading()


async def _drained(loop, transport):
    """Wait until the transport's write buffer is empty: with both limits at 0 the transport
    calls ``pause_writing()`` while anything is buffered and ``resume_writing()`` once nothing is.
    A stand-in protocol hears those calls for the time being and passes them on, so the
    application's protocol stays in step (it also gets ``connection_lost``)."""
    protocol = transport.get_protocol()
    low, high = transport.get_write_buffer_limits()
    watcher = _DrainWatcher(loop, protocol)
    transport.set_protocol(watcher)
    try:
        transport.set_write_buffer_limits(0, 0)
        if transport.get_write_buffer_size():
            await watcher.empty
    finally:
        transport.set_protocol(protocol)
        if not transport.is_closing():
            transport.set_write_buffer_limits(high, low)


class _DrainWatcher(asyncio.Protocol):
    def __init__(self, loop, protocol):
        self.protocol = protocol
        self.empty = loop.create_future()

    def pause_writing(self):
        self.protocol.pause_writing()

    def resume_writing(self):
        if not self.empty.done():
            self.empty.set_result(None)
        self.protocol.resume_writing()

    def connection_lost(self, exc):
        if not self.empty.done():
            self.empty.set_exception(ConnectionError("Connection is closed by peer"))
        self.protocol.connection_lost(exc)

    def data_received(self, data):  # reading is paused: only what was already on its way
        self.protocol.data_received(data)  # (a BufferedProtocol's transport never reads here)

    def eof_received(self):
        return self.protocol.eof_received()
