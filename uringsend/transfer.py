"""Transfer: the caller's handle on one file-to-socket send, and its timeline of events."""
import time
from typing import NamedTuple, Optional

from .errors import ReleaseNotReported

SENT = "sent"          # the socket accepted these bytes
RELEASED = "released"  # the kernel no longer references the memory those bytes came from
QUEUED = "queued"      # handed to the socket by reference (splice); no release will follow


class Event(NamedTuple):
    kind: str
    offset: Optional[int]   # file offset of the chunk; None for the header
    nbytes: int
    copied: Optional[bool]  # for RELEASED: the kernel copied the bytes (True) or sent the pages (False)
    t_ns: int               # time.perf_counter_ns() when the completion was reaped


class Transfer:
    """One file (range) sent to one socket. Returned at once by ``Ring.sendfile``.

    ``sent`` counts file bytes the socket accepted, in order; ``header_sent`` the header's.
    """

    def __init__(self, ring, mode, sock_fd, file_fd, offset, count, header_len, on_release=None):
        self.ring = ring
        self.mode = mode
        self.sock_fd = sock_fd
        self.file_fd = file_fd
        self.offset = offset
        self.count = count          # bytes planned (clamped to the file's size at the start)
        self.header_len = header_len
        self.on_release = on_release
        self.sent = 0
        self.header_sent = 0
        self.events = []
        self.error = None
        self.fallback = None        # why auto mode used something else than it first chose
        self.stranded = 0           # bytes found left in a pipe after a broken chain (drained)
        self.started_ns = time.perf_counter_ns()
        self.done = False           # no more bytes will be sent
        self.settled = False        # done, and nothing the kernel held is still outstanding
        self._callback_error = None
        self._cancel = None

    # --- driving -------------------------------------------------------------------------------
    def wait(self, timeout=None):
        """Block until the transfer ends; returns bytes of the file sent, or raises its error."""
        if not self.done:
            self.ring._drive(lambda: self.done, timeout)
        if self._callback_error is not None:
            raise self._callback_error
        if self.error is not None:
            raise self.error
        return self.sent

    def wait_released(self, timeout=None):
        """Block until every buffer or page this transfer used has been released by the kernel."""
        if self.mode == "splice":
            raise ReleaseNotReported(
                "splice mode hands page-cache pages to the socket by reference and the kernel never "
                "reports when it drops them; use mode='zerocopy', 'mmap' or 'copy' for release events")
        if not self.settled:
            self.ring._drive(lambda: self.settled, timeout)
        return self.wait(0)

    def cancel(self):
        """Ask the kernel to stop this transfer. Buffers stay held until their release arrives."""
        if not self.done and self._cancel is not None:
            self.ring._check_owner()
            self._cancel()

    # --- views ---------------------------------------------------------------------------------
    @property
    def short(self):
        """True when the transfer ended without error before ``count`` bytes (the file shrank)."""
        return self.done and self.error is None and self.sent < self.count

    def released_bytes(self):
        return sum(e.nbytes for e in self.events if e.kind == RELEASED and e.offset is not None)

    def __repr__(self):
        state = "settled" if self.settled else "done" if self.done else "running"
        return (f"<Transfer {self.mode} fd {self.file_fd}->{self.sock_fd} {self.sent}/{self.count} "
                f"bytes {state}{' error=' + repr(self.error) if self.error else ''}>")

    # --- engine side ---------------------------------------------------------------------------
    def _event(self, kind, offset, nbytes, copied, t_ns):
        ev = Event(kind, offset, nbytes, copied, t_ns)
        self.events.append(ev)
        if kind == RELEASED and self.on_release is not None and self._callback_error is None:
            try:
                self.on_release(ev)
            except Exception as exc:  # never let a callback break the reaper: raise it from wait()
                self._callback_error = exc
