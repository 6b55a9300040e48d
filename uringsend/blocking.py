"""uringsend.sendfile(): a blocking send with a ring of its own, and the os.sendfile fallback."""
import os

from .errors import IoUringUnavailable
from ._args import _file_fd, _nonneg, _regular_stat, _sock_fd
from .ring import Ring
from .transfer import QUEUED, Transfer


def sendfile(sock, file, offset=0, count=None, *, mode="auto", header=b"", on_release=None,
             timeout=None):
    """Send and wait for every release (stable modes). Returns the finished Transfer.

    With mode='auto' and io_uring unavailable (kernel or seccomp), falls back to blocking
    os.sendfile; the transfer's ``mode`` is then 'sendfile' and ``fallback`` says why.
    """
    try:
        ring = Ring(entries=64)
    except IoUringUnavailable as exc:
        if mode != "auto":
            raise
        return _os_sendfile(sock, file, offset, count, header, str(exc))
    with ring:
        t = ring.sendfile(sock, file, offset, count, mode=mode, header=header, on_release=on_release)
        if t.mode == "splice":
            t.wait(timeout)
        else:
            t.wait_released(timeout)
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
        t = Transfer(_Done(), "sendfile", sock_fd, user_file, offset,
                     count if count is not None else end - offset, len(header))
        t.fallback = f"io_uring unavailable, used blocking os.sendfile: {why}"
        if header:
            view = memoryview(bytes(header))
            while t.header_sent < len(view):
                t.header_sent += os.write(sock_fd, view[t.header_sent:])
        pos = offset
        while pos < end:
            n = os.sendfile(sock_fd, file_fd, pos, end - pos)
            if n == 0:
                break
            t._event(QUEUED, pos, n, None, t.started_ns)
            pos += n
        t.sent = pos - offset
        t.done = t.settled = True
        return t
    finally:
        os.close(file_fd)
