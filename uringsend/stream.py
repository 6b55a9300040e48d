"""Sending memory: ``Ring.send`` (one buffer) and ``StreamWriter`` (a registered circular buffer).

Both are memory sources of the C engine's chains: the bytes go out in chunks with SEND_ZC or
SEND, and every chunk is released by a kernel report, never by a convention. For SEND_ZC the
report is the notification CQE (IORING_CQE_F_NOTIF): until it arrives the kernel may still read
the memory, and what is written there changes what the peer gets [KF 14]. For SEND the kernel
copied the bytes before the result CQE.

``Ring.send`` pins the caller's buffer (cffi ``from_buffer``: a bytearray cannot be resized, an
mmap cannot be closed) until the transfer settles, then unpins it once. The pin goes with the
transfer, not with the handle: a transfer whose ring closed while the kernel may still read its
memory keeps its pin for the life of the process.

``StreamWriter`` owns an anonymous mapping registered in a slot of the ring's buffer table and
sends from it with SEND_ZC and IORING_RECVSEND_FIXED_BUF. Bytes are numbered by stream offset;
offset ``s`` lives at ``s % size``. A byte's place is handed out again only once the engine's
contiguous released prefix (``released_upto``) passed it: a writer whose reader stalls waits,
it never overwrites. One engine transfer carries the whole stream, so bytes reach the socket in
order; the engine never lets a chunk cross the end of the buffer.
"""
import asyncio
import errno
import mmap
import os
import socket
import threading
import time

from . import _lowlevel as ll
from ._args import _sock_fd
from .errors import RingOwnerError, TransferCancelled, memlock_text
from .transfer import Transfer

SEND_MODES = {"auto": "copy", "zerocopy": "zerocopy", "copy": "copy"}
_CODES = {"zerocopy": ll.MODE_SEND_ZC, "copy": ll.MODE_SEND}
# the writer's modes; 'auto': SEND_ZC until the notifications say the kernel copies anyway
_STREAM_CODES = {**_CODES, "auto": ll.MODE_SEND_ZC_UNLESS_COPIED}
_WAIT_SLICE = 0.25
# Transfers from memory not settled yet, with their pins: kept here (not by the ring, which drops
# its handles when it closes) so that no pin goes while the kernel may read the memory.
_pinned = set()


# ---- arguments ---------------------------------------------------------------------------------
def stream_socket(sock, op):
    """The fd of a stream socket, or a clear TypeError/OSError/ValueError naming ``op``."""
    fd = _sock_fd(sock, op)
    if isinstance(sock, socket.socket):
        kind = sock.type
    else:
        probe = socket.socket(fileno=fd)  # reads SO_TYPE; detached below, the fd stays the caller's
        try:
            kind = probe.type
        finally:
            probe.detach()
    if kind != socket.SOCK_STREAM:
        raise ValueError(f"{op}: fd {fd} is a {socket.SocketKind(kind).name} socket; only SOCK_STREAM "
                         "sockets are supported")
    return fd


def byte_view(data, op):
    """A flat, contiguous memoryview of ``data``, or a clear TypeError/ValueError."""
    if isinstance(data, str):
        raise TypeError(f"{op}: data must be a bytes-like object (bytes, bytearray, memoryview, mmap), "
                        "not str; encode it first")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{op}: data must be a bytes-like object (bytes, bytearray, memoryview, mmap), "
                        f"not {type(data).__name__}") from None
    except ValueError as exc:  # a closed mmap, a released memoryview
        raise ValueError(f"{op}: data cannot be read: {exc}") from None
    if not view.c_contiguous:
        view.release()
        raise ValueError(f"{op}: data must be C-contiguous (a strided memoryview slice is not); "
                         "copy it with bytes(view) first")
    if view.ndim != 1 or view.itemsize != 1:
        flat = view.cast("B")
        view.release()
        view = flat
    return view


def _mode(mode, modes):
    if type(mode) is not str or mode not in modes:
        raise ValueError(f"mode must be one of {', '.join(modes)}, not {mode!r}")
    return modes[mode]


def _start_error(core, op, fd, size=None):
    why, err, _ = core.start_error()
    if why == ll.START_NO_SLOT:
        return OSError(errno.ENOSPC, f"{op}: all stream buffer slots of this ring are in use; close a "
                       "stream writer first")
    if why == ll.START_REGISTER:
        text = f"{op}: io_uring_register_buffers_update (1 x {size} bytes): {os.strerror(err)}"
        if err == errno.ENOMEM:
            text += (f": registered buffers count against RLIMIT_MEMLOCK ({memlock_text()}); "
                     "use a smaller size or raise the limit")
        return OSError(err, text)
    return OSError(err, f"{op} on fd {fd}: {os.strerror(err)}")


# ---- Ring.send ---------------------------------------------------------------------------------
class MemoryTransfer(Transfer):
    """A ``Transfer`` whose source is memory: ``offset`` of its events is the offset within
    ``data``. Its pin (and the memoryview it was taken from) is released once, when it settles."""

    __slots__ = ("_pin", "_view", "_wake")

    def __init__(self, driver, x, mode, sock_fd, nbytes, on_release, pin, view):
        super().__init__(driver, x, mode, sock_fd, None, nbytes, on_release)
        self._pin = pin
        self._view = view
        self._wake = None       # AsyncStreamWriter: told of every change (release, end)

    @property
    def pinned(self):
        """The caller's buffer is still pinned (the kernel may read it)."""
        return self._pin is not None

    @property
    def fallback(self):
        if self._x.fallback == ll.FALLBACK_COPIED:
            return ("the kernel copied the SEND_ZC data (its notifications said so 8 times in a row): "
                    "copying sends cost less")
        return super().fallback

    @property
    def released_upto(self):
        """Every byte below this offset has been released by the kernel."""
        return self._x.released_upto

    def _changed(self, what):
        """The driver's listener (``Transfer._changed``), plus the pin and the writer's wake-up:
        the engine reports a memory transfer's end as a release too, so this sees the last one."""
        super()._changed(what)
        self._catch_up()

    def _catch_up(self):
        self._fire_releases()
        if self._pin is not None and self._x.settled:
            self._unpin()
        wake = self._wake
        if wake is not None:
            if self._x.settled:
                self._wake = None  # the last change: no reference back to the writer is kept
            wake()

    def _unpin(self):
        self._pin.unpin()
        self._pin = None
        if self._view is not None:
            self._view.release()
            self._view = None
        _pinned.discard(self)

    def __repr__(self):
        state = "settled" if self.settled() else "done" if self.done() else "running"
        error = self.error
        return (f"<Transfer {self.mode} memory->{self.sock_fd} {self.sent}/{self.count} bytes "
                f"{state}{' error=' + repr(error) if error else ''}>")


def _adopt(ring, x, transfer):
    """Track a memory transfer until it settles: the ring's driver reports its changes (releases,
    its end) to ``transfer._changed``; until then the pin stays in ``_pinned``."""
    if x.settled:  # ended inside the start call (empty, or small and inline)
        transfer._catch_up()
        return transfer
    _pinned.add(transfer)
    ring.driver.watch(x, transfer._changed)
    if x.nevents:
        transfer._catch_up()  # release callbacks for what completed inside the start call
    return transfer


def send(ring, sock, data, *, mode="auto", on_release=None):
    """``Ring.send``: see its docstring. The ring's owner check has been made."""
    name = _mode(mode, SEND_MODES)
    if on_release is not None and not callable(on_release):
        raise TypeError("on_release must be callable")
    sock_fd = stream_socket(sock, "send")
    view = byte_view(data, "send")
    try:
        pin = ll.Pinned(view)
    except BaseException:
        view.release()
        raise
    core = ring.driver.core
    x = ll.mem_send(core.ptr, _CODES[name], sock_fd, pin.address, view.nbytes, 0)
    if x == ll.NULL:
        pin.unpin()
        view.release()
        raise _start_error(core, "send", sock_fd)
    x = ll.gc(x, ll.xfer_put)
    return _adopt(ring, x, MemoryTransfer(ring.driver, x, name, sock_fd, view.nbytes, on_release, pin, view))


# ---- the stream writer -------------------------------------------------------------------------
class StreamError(OSError):
    """Raised by a stream writer used after it was closed."""


class StreamWriter:
    """A zero-copy writer on a registered circular buffer of ``size`` bytes (``Ring.stream``).

    ``write(data)`` copies into the buffer and sends; ``reserve(n)`` hands out a writable view to
    fill in place and ``commit(n)`` sends what was filled (no copy by uringsend at all). A part
    of the buffer is handed out again only after the kernel released it (the SEND_ZC
    notification): with a reader that stalls the writer waits. ``flush()`` waits until every
    byte is released; ``close()`` flushes, ends the stream and gives the buffer slot back.
    """

    def __init__(self, ring, sock, size=1 << 20, *, mode="zerocopy"):
        if not isinstance(size, int) or isinstance(size, bool) or not ll.PAGE <= size <= (1 << 30) \
                or size % ll.PAGE:
            raise ValueError(f"size must be an int in {ll.PAGE}..2**30 and a multiple of {ll.PAGE}, "
                             f"not {size!r}")
        name = _mode(mode, {name: name for name in _STREAM_CODES})
        self.ring = ring
        self.size = size
        self._owner = threading.get_ident()  # the ring's thread (Ring.stream checked it)
        self.sock_fd = stream_socket(sock, "stream")
        self.waits = 0             # times a reserve waited for the kernel to release space
        self.wrapped = 0           # times the write position went past the end of the buffer
        self._view = None          # the last reserved view, until committed
        self._closed = False
        self._backlog = max(ll.PAGE, size // 8)
        self._buffer = mmap.mmap(-1, size)
        pin = ll.Pinned(self._buffer)
        core = ring.driver.core
        x = ll.stream_open(core.ptr, _STREAM_CODES[name], self.sock_fd, pin.address, size, 0)
        if x == ll.NULL:
            pin.unpin()
            self._buffer.close()
            raise _start_error(core, "stream", self.sock_fd, size)
        x = ll.gc(x, ll.xfer_put)
        self._x = x
        self.transfer = _adopt(ring, x, MemoryTransfer(ring.driver, x, name, self.sock_fd, None, None, pin, None))

    # ---- state ---------------------------------------------------------------------------------
    @property
    def mode(self):
        return self.transfer.mode

    @property
    def committed(self):
        """Stream bytes committed so far (the stream offset of the next reserve)."""
        return self._x.end

    @property
    def sent(self):
        """Stream bytes the socket accepted, in order."""
        return self._x.sent

    @property
    def released(self):
        """Every stream byte below this offset has been released: its place may be reused."""
        return self._x.released_upto

    @property
    def closed(self):
        return self._closed

    def writable(self):
        """Bytes that may be reserved now without waiting (in one view: up to the buffer's end)."""
        return min(self.size - (self._x.end - self._x.released_upto), self.size - self._x.end % self.size)

    def statistics(self):
        x = self._x
        return {"size": self.size, "committed": x.end, "sent": x.sent, "released": x.released_upto,
                "in_flight": x.end - x.released_upto, "copied": x.copied_bytes,
                "zerocopy": x.zerocopy_bytes, "waits": self.waits, "wrapped": self.wrapped}

    # ---- writing -------------------------------------------------------------------------------
    def reserve(self, n, timeout=None):
        """A writable memoryview of up to ``n`` bytes at the write position: ``n`` bytes, or fewer
        at the end of the buffer (fill them, commit, reserve again). Waits (up to ``timeout``
        seconds, TimeoutError) until the kernel released that space."""
        self._check_open()
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.size:
            raise ValueError(f"reserve: n must be an int in 1..{self.size} (the buffer size), not {n!r}")
        if self._view is not None:
            _let_go(self._view)  # reserving again drops the reservation not committed
        x = self._x
        at = x.end % self.size
        n = min(n, self.size - at)
        if self.size - (x.end - x.released_upto) < n:
            self.waits += 1
            self._wait(lambda: self.size - (x.end - x.released_upto) >= n, timeout)
        self._view = memoryview(self._buffer)[at:at + n]
        return self._view

    def commit(self, n):
        """Send the first ``n`` bytes of the last reserved view. The view is released: what is
        written to the buffer from now on cannot change those bytes."""
        view = self._view
        if view is None:
            raise ValueError("commit without a reserved view")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(view):
            raise ValueError(f"commit: n must be an int in 0..{len(view)} (the reserved view), not {n!r}")
        self._view = None
        _let_go(view)
        if not n:
            return
        if threading.get_ident() != self._owner:
            raise RingOwnerError("a stream writer is used only by its ring's thread")
        if self.ring.closed:
            raise self._failure()
        x = self._x
        lap = x.end // self.size
        ret = ll.stream_commit(self.ring.driver.core.ptr, x, n)
        if ret < 0:
            raise self._failure()
        if x.end // self.size > lap:  # a view never crosses the end: this commit reached it
            self.wrapped += 1
        if ret == 1 and x.end - x.sent >= self._backlog:
            # Behind the chain in flight: once enough waits, look whether that chain is over, so
            # that the next one takes these bytes (one enter per commit would cost more CPU).
            self.ring.poll(0)

    def write(self, data, timeout=None):
        """Copy ``data`` into the buffer and send it, waiting for released space as needed
        (``timeout`` bounds each wait). Returns the number of bytes written. A write that fails
        (TimeoutError, the stream's error) may have committed a first part: ``committed`` says
        how far the stream got."""
        self._check_open()
        view = byte_view(data, "write")
        with view:
            total = view.nbytes
            done = 0
            while done < total:
                room = self.reserve(min(total - done, self.size), timeout)
                k = len(room)
                room[:] = view[done:done + k]
                self.commit(k)
                done += k
        return total

    def flush(self, timeout=None):
        """Wait until every committed byte was sent and released by the kernel."""
        self._check_open()
        x = self._x
        self._wait(lambda: x.released_upto >= x.end, timeout)

    def close(self, timeout=None):
        """Flush (up to ``timeout``), end the stream and wait (up to the ring's ``close_timeout``)
        until the kernel released everything; the buffer slot goes back to the ring. Raises the
        stream's error, if it failed. If the ring closed first, or time runs out, the buffer
        stays alive as long as the kernel may read it."""
        if self._closed:
            return
        ring, x = self.ring, self._x
        try:
            if not ring.closed and not x.done:
                self.flush(timeout)
        finally:
            if self._end():
                try:
                    self._wait(lambda: x.settled, ring.close_timeout, final=True)
                except TimeoutError:
                    pass  # the pin stays (uringsend.stream._pinned) until the kernel lets go
        self._raise_error()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<StreamWriter {self.mode} fd {self.sock_fd} size {self.size} committed {self.committed} "
                f"released {self.released}{' closed' if self._closed else ''}>")

    # ---- waiting -------------------------------------------------------------------------------
    def _end(self):
        """Mark closed and end the stream's transfer (cancelled if bytes are still unreleased);
        True when the ring is open to drive it to its end."""
        self._closed = True
        if self._view is not None:
            _let_go(self._view)
            self._view = None
        ring, x = self.ring, self._x
        if ring.closed:
            return False
        if not x.done and x.released_upto < x.end:
            self.transfer.cancel()  # the flush did not finish: stop sending
        ll.stream_end(ring.driver.core.ptr, x)
        return True

    def _raise_error(self):
        x = self._x
        if x.error and x.err_kind != ll.ERR_CANCELLED:
            raise self.transfer.error

    def _check_open(self):
        if self._closed:
            raise StreamError(errno.EPIPE, "the stream writer is closed")
        if self._x.done:
            raise self._failure()

    def _failure(self):
        if self.ring.closed and not self._x.error:
            return ValueError("the ring is closed")
        error = self.transfer.error
        if error is None:
            return StreamError(errno.EPIPE, "the stream ended")
        if isinstance(error, TransferCancelled):
            return TransferCancelled(f"the stream was cancelled after {self._x.sent} bytes "
                                     "(its ring was closed, or close() ran out of time)")
        return error

    def _wait(self, ready, timeout, final=False):
        """Drive the ring until ``ready()``; raise the stream's error if it ends first."""
        ring = self.ring
        x = self._x
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if x.done and not final:
                raise self._failure()
            if ring.closed:
                raise self._failure()
            left = _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"stream: timed out waiting for the kernel ({self.statistics()})")
            try:
                ring.poll(left)
            except InterruptedError:
                continue


def _let_go(view):
    """Release a reserved view, so that it cannot change bytes in flight. A view something else
    still exports (``memoryview(view)``, numpy) cannot be released: it stays usable, and what is
    written through it before the release changes what the peer may get."""
    try:
        view.release()
    except BufferError:
        pass


# ---- asyncio -----------------------------------------------------------------------------------
class AsyncStreamWriter:
    """A ``StreamWriter`` on an ``uringsend.aio.AsyncRing``: ``await write(data)``,
    ``await drain()`` (every byte released), ``await aclose()``. ``reserve``/``commit`` work as
    in the blocking writer; ``await wait_writable(n)`` waits for room without blocking the loop."""

    def __init__(self, aring, sock, size=1 << 20, *, mode="zerocopy"):
        self._aring = aring
        self._loop = asyncio.get_running_loop()
        self.writer = StreamWriter(aring.ring, sock, size, mode=mode)
        self.writer.transfer._wake = self._changed
        self._waiter = None

    def __getattr__(self, name):
        return getattr(self.writer, name)

    def _changed(self):
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _until(self, ready, final=False):
        w = self.writer
        while not ready():
            if w._x.done and not final:
                raise w._failure()
            if self._aring.closed:
                raise w._failure()
            self._waiter = self._loop.create_future()
            w.ring.poll(0)  # what completed before the wait (no eventfd signal comes for it)
            if ready() or w._x.done:
                continue
            await self._waiter

    async def wait_writable(self, n=1):
        """Wait until ``n`` bytes (at most the buffer's end) may be reserved without waiting."""
        w = self.writer
        n = min(n, w.size - w._x.end % w.size)
        await self._until(lambda: w.size - (w._x.end - w._x.released_upto) >= n)

    async def write(self, data):
        """Copy ``data`` into the buffer and send it; waits (on the loop) for released space."""
        w = self.writer
        w._check_open()
        view = byte_view(data, "write")
        with view:
            total = view.nbytes
            done = 0
            while done < total:
                want = min(total - done, w.size)
                await self.wait_writable(want)
                room = w.reserve(want, 0)
                k = len(room)
                room[:] = view[done:done + k]
                w.commit(k)
                done += k
        return total

    async def drain(self):
        """Wait until every committed byte was sent and released by the kernel."""
        x = self.writer._x
        await self._until(lambda: x.released_upto >= x.end)

    async def aclose(self):
        """Drain, end the stream and wait until the kernel released everything (its buffer
        slot goes back to the ring); raises the stream's error, if it failed."""
        w = self.writer
        if w.closed:
            return
        try:
            if not self._aring.closed and not w._x.done:
                await self.drain()
        finally:
            if w._end():
                x = w._x
                try:
                    await asyncio.wait_for(self._until(lambda: x.settled, final=True),
                                           w.ring.close_timeout)
                except asyncio.TimeoutError:
                    pass  # the pin stays until the kernel lets go
        w._raise_error()
