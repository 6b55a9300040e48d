"""uringsend.sendfile(): a blocking send on a ring kept per thread, and the os.sendfile fallback."""
import atexit
import os
import socket
import threading

from ._args import _file_fd, _nonneg, _regular_stat, _sock_fd
from .errors import IoUringUnavailable
from .ring import Ring, _joined

_local = threading.local()
_unavailable = []  # the IoUringUnavailable met once: io_uring is not tried again in this process
_fallbacks = [0, None]  # calls that fell back to os.sendfile, and why


def _thread_ring():
    """This thread's ring for sendfile(): made on first use, closed when the thread ends (its
    thread-local goes) or, for the main thread, at interpreter exit."""
    ring = getattr(_local, "ring", None)
    if ring is None or ring.closed or ring.driver.forked():
        ring = _local.ring = Ring(entries=64)
        if threading.current_thread() is threading.main_thread():
            atexit.register(_close_main_ring, ring)
    return ring


def close_thread_ring():
    """Close this thread's sendfile() ring now (a new one is made on the next call)."""
    ring = getattr(_local, "ring", None)
    _local.ring = None
    if ring is not None and not ring.closed and not ring.driver.forked():
        ring.close()


def _close_main_ring(ring):
    if not ring.closed and not ring.driver.forked():
        ring.close()


def fallback():
    """(calls of sendfile() that used blocking os.sendfile because io_uring is unavailable, why)."""
    return tuple(_fallbacks)


def sendfile(sock, file, offset=0, count=None, *, mode="auto", headers=None, trailers=None,
             on_release=None, timeout=None, header=None):
    """Send ``count`` bytes (None: to EOF) of ``file`` from ``offset`` to ``sock`` and return
    the number of file bytes sent once the kernel released every buffer (modes other than
    'splice': the file's range may then be changed without the peer seeing it).

    As ``socket.sendfile``: with a socket object and a file object, the file's position is set
    to ``offset`` + bytes sent on return, also after an error; ``count`` must then be positive,
    and the socket a SOCK_STREAM one (ValueError otherwise). With file descriptors, as
    ``os.sendfile``: positions are left alone and ``count=0`` sends nothing.
    ``headers``/``trailers``: bytes (or a sequence of bytes) sent before and after the file's
    bytes, as one stream; not counted in the result.

    Uses one ring per thread, kept between calls. With mode='auto' and io_uring unavailable
    (kernel or seccomp), falls back to blocking os.sendfile (``uringsend.blocking.fallback()``
    counts those calls and says why). On a timeout or an interruption the transfer is cancelled;
    its buffers stay with the ring until the kernel releases them.
    """
    if header is not None:
        if headers is not None:
            raise TypeError("pass headers= or its synonym header=, not both")
        headers = header
    seek = None
    if isinstance(sock, socket.socket):  # socket.sendfile's conventions (Ring.sendfile checks the type)
        if count is not None:
            if not isinstance(count, int) or isinstance(count, bool):
                raise TypeError(f"count must be a positive integer (got {count!r})")
            if count <= 0:
                raise ValueError(f"count must be a positive integer (got {count!r})")
        if hasattr(file, "seek") and hasattr(file, "fileno"):
            if "b" not in getattr(file, "mode", "b"):
                raise ValueError("file should be opened in binary mode")
            seek = file.seek
    sent = 0
    try:
        if _unavailable:
            if mode != "auto":
                raise _unavailable[0]
            sent = _os_sendfile(sock, file, offset, count, headers, trailers, str(_unavailable[0]))
            return sent
        try:
            ring = _thread_ring()
        except IoUringUnavailable as exc:
            _unavailable.append(exc)
            if mode != "auto":
                raise
            sent = _os_sendfile(sock, file, offset, count, headers, trailers, str(exc))
            return sent
        t = ring.sendfile(sock, file, offset, count, mode=mode, headers=headers, trailers=trailers,
                          on_release=on_release)
        try:
            if t.mode != "splice":
                t.released(timeout)
            sent = t.result(timeout)
            return sent
        except BaseException:
            t.cancel()
            sent = t.sent
            raise
    finally:
        if seek is not None and isinstance(offset, int):
            seek(offset + sent)


def _os_sendfile(sock, file, offset, count, headers, trailers, why):
    offset = _nonneg("offset", offset)
    if isinstance(sock, socket.socket) and sock.type != socket.SOCK_STREAM:
        raise ValueError("only SOCK_STREAM type sockets are supported")
    head, tail = _joined("headers", headers), _joined("trailers", trailers)
    sock_fd = _sock_fd(sock)
    file_fd, _ = _file_fd(file)
    _fallbacks[0] += 1
    _fallbacks[1] = f"io_uring unavailable, used blocking os.sendfile: {why}"
    try:
        size = _regular_stat(file_fd, file).st_size
        if offset > size:
            raise ValueError(f"offset {offset} is past the end of the file ({size} bytes)")
        end = size if count is None else min(size, offset + _nonneg("count", count))
        _write_all(sock_fd, head)
        pos = offset
        while pos < end:
            n = os.sendfile(sock_fd, file_fd, pos, end - pos)
            if n == 0:
                break
            pos += n
        _write_all(sock_fd, tail)
        return pos - offset
    finally:
        os.close(file_fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
