"""uringsend.sendfile(): a blocking send on a ring kept per thread, and the os.sendfile fallback."""
import atexit
import os
import threading

from .errors import IoUringUnavailable
from ._args import _file_fd, _nonneg, _regular_stat, _sock_fd
from .ring import Ring, _forks
from .transfer import QUEUED, State, Transfer


_local = threading.local()
_unavailable = []  # the IoUringUnavailable met once: io_uring is not tried again in this process


def _thread_ring():
    """This thread's ring for sendfile(): made on first use, closed when the thread ends (its
    thread-local goes) or, for the main thread, at interpreter exit."""
    ring = getattr(_local, "ring", None)
    if ring is None or ring.closed or ring._fork != _forks[0]:
        ring = _local.ring = Ring(entries=64)
        if threading.current_thread() is threading.main_thread():
            atexit.register(_close_main_ring, ring)
    return ring


def close_thread_ring():
    """Close this thread's sendfile() ring now (a new one is made on the next call)."""
    ring = getattr(_local, "ring", None)
    _local.ring = None
    if ring is not None and not ring.closed and ring._fork == _forks[0]:
        ring.close()


def _close_main_ring(ring):
    if not ring.closed and ring._fork == _forks[0]:
        ring.close()


def sendfile(sock, file, offset=0, count=None, *, mode="auto", header=b"", on_release=None,
             timeout=None):
    """Send and wait for every release (stable modes). Returns the finished Transfer.

    Uses one ring per thread, kept between calls. With mode='auto' and io_uring unavailable
    (kernel or seccomp), falls back to blocking os.sendfile; the transfer's ``mode`` is then
    'sendfile' and ``fallback`` says why. On a timeout or an interruption the transfer is
    cancelled; its buffers stay with the ring until the kernel releases them.
    """
    if _unavailable:
        if mode != "auto":
            raise _unavailable[0]
        return _os_sendfile(sock, file, offset, count, header, str(_unavailable[0]))
    try:
        ring = _thread_ring()
    except IoUringUnavailable as exc:
        _unavailable.append(exc)
        if mode != "auto":
            raise
        return _os_sendfile(sock, file, offset, count, header, str(exc))
    t = ring.sendfile(sock, file, offset, count, mode=mode, header=header, on_release=on_release)
    try:
        if t.mode == "splice":
            t.wait(timeout)
        else:
            t.wait_released(timeout)
    except BaseException:
        t.cancel()
        raise
    return t


class _Done:
    """Stands in for a ring for a transfer that already finished synchronously."""

    def _drive(self, until, timeout):
        if not until():
            raise RuntimeError("nothing to drive")


def _os_sendfile(sock, file, offset, count, header, why):
    offset = _nonneg("offset", offset)
    sock_fd = _sock_fd(sock)
    file_fd, user_file = _file_fd(file)
    try:
        size = _regular_stat(file_fd, file).st_size
        if offset > size:
            raise ValueError(f"offset {offset} is past the end of the file ({size} bytes)")
        end = size if count is None else min(size, offset + _nonneg("count", count))
        state = State(offset, end - offset, len(header))
        t = Transfer(_Done(), state, "sendfile", sock_fd, user_file, count, None)
        t._fallback = f"io_uring unavailable, used blocking os.sendfile: {why}"
        if header:
            view = memoryview(bytes(header))
            while state.header_sent < len(view):
                state.header_sent += os.write(sock_fd, view[state.header_sent:])
        pos = offset
        while pos < end:
            n = os.sendfile(sock_fd, file_fd, pos, end - pos)
            if n == 0:
                break
            t._event(QUEUED, pos, n, None, t.started_ns)
            pos += n
        state.sent = pos - offset
        state.done = state.settled = True
        return t
    finally:
        os.close(file_fd)
