"""Transfer: the caller's handle on one file-to-socket send, and its timeline of events.

The transfer's state lives in the C engine (``struct us_xfer``); the handle reads it there and
turns the timeline into ``Event`` tuples only when someone asks for them. The handle refers to its
ring, never the other way round (the ring keeps only the handles that asked to be told about
changes, until they settle), so dropping a handle frees it at once and the transfer still runs.
"""
import errno
import os
import time
from typing import NamedTuple, Optional

from . import _lowlevel as ll
from .errors import ReleaseNotReported, TransferCancelled, fd_name, memlock_text, op_error

SENT = "sent"          # the socket accepted these bytes
RELEASED = "released"  # the kernel no longer references the memory those bytes came from
QUEUED = "queued"      # handed to the socket by reference (splice); no release will follow
_KINDS = {ll.SENT: SENT, ll.RELEASED: RELEASED, ll.QUEUED: QUEUED}
_COPIED = {-1: None, 0: False, 1: True}


class Event(NamedTuple):
    kind: str
    offset: Optional[int]   # file offset of the chunk; None for the header
    nbytes: int
    copied: Optional[bool]  # for RELEASED: the kernel copied the bytes (True) or sent the pages (False)
    t_ns: int               # time.perf_counter_ns() when the completion was handled


class State:
    """Transfer state kept in Python, for transfers the C engine does not run (tee, the
    os.sendfile fallback): the same fields as ``struct us_xfer``."""

    __slots__ = ("sent", "header_sent", "stranded", "done", "settled", "error", "nevents",
                 "started_ns", "offset", "planned", "header_len")

    def __init__(self, offset, planned, header_len):
        self.offset = offset
        self.planned = planned
        self.header_len = header_len
        self.sent = self.header_sent = self.stranded = self.nevents = self.error = 0
        self.done = self.settled = False
        self.started_ns = time.perf_counter_ns()


class Transfer:
    """One file (range) sent to one socket. Returned at once by ``Ring.sendfile``.

    ``sent`` counts file bytes the socket accepted, in order; ``header_sent`` the header's.
    """

    __slots__ = ("ring", "mode", "sock_fd", "file_fd", "on_release", "_x", "_count", "_events",
                 "_error", "_fired", "_callback_error", "_fallback", "__weakref__")

    def __init__(self, ring, x, mode, sock_fd, file_fd, count, on_release):
        self.ring = ring
        self._x = x                 # struct us_xfer (C engine) or State
        self.mode = mode
        self.sock_fd = sock_fd      # the caller's fds, for error texts and repr
        self.file_fd = file_fd      # None when the file was given by path
        self._count = count         # as asked; None: to the end of the file
        self.on_release = on_release
        self._events = []
        self._error = None
        self._fired = 0             # RELEASED events handed to on_release so far
        self._callback_error = None
        self._fallback = None       # set for Python-run transfers

    @property
    def offset(self):
        return self._x.offset

    @property
    def count(self):
        """Bytes asked for; without a count, the bytes to the end of the file at the start."""
        return self._x.planned if self._count is None else self._count

    @property
    def header_len(self):
        return self._x.header_len

    # --- state ---------------------------------------------------------------------------------
    @property
    def sent(self):
        return self._x.sent

    @property
    def header_sent(self):
        return self._x.header_sent

    @property
    def stranded(self):
        """Bytes found left in a pipe after a broken chain (drained, and sent again from the file)."""
        return self._x.stranded

    @property
    def done(self):
        """No more bytes will be sent."""
        return bool(self._x.done)

    @property
    def settled(self):
        """Done, and nothing the kernel held for this transfer is still outstanding."""
        return bool(self._x.settled)

    @property
    def started_ns(self):
        return self._x.started_ns

    @property
    def released_ns(self):
        """``time.perf_counter_ns()`` of the latest release so far (None before the first): for
        a settled transfer in a releasing mode, when the kernel let go of its last chunk."""
        if isinstance(self._x, State):
            times = [e.t_ns for e in self._events if e.kind == RELEASED]
            return max(times) if times else None
        return self._x.released_ns or None

    @property
    def fallback(self):
        """Why the transfer sends differently from how its mode first chose, or None."""
        if self._fallback is None and not isinstance(self._x, State) and self._x.fallback:
            self._fallback = "SEND_ZC is not supported on this socket (EOPNOTSUPP): copying sends"
        return self._fallback

    @property
    def error(self):
        """The exception the transfer ended with, or None."""
        if self._error is None and self._x.error:
            self._error = self._make_error()
        return self._error

    def _make_error(self):
        x = self._x
        err = x.error
        kind = x.err_kind
        if kind == ll.ERR_CANCELLED:
            return TransferCancelled(f"transfer cancelled after {x.sent} of {self.count} bytes")
        if kind == ll.ERR_TRUNCATED:
            zeros = self.offset + x.sent - x.err_size
            return OSError(errno.EFAULT, (
                f"send from the mapping of {fd_name(self.file_fd)}: the file shrank to {x.err_size} bytes "
                f"during the transfer and the {zeros} bytes after that went out as zeros (modes "
                "'splice' and 'zerocopy' read the file and stop at its end)"))
        if kind == ll.ERR_MEMLOCK:
            return OSError(errno.ENOMEM, (
                f"send_zc on {fd_name(self.sock_fd)}: {os.strerror(errno.ENOMEM)}: pages pinned by "
                f"zero-copy sends count against RLIMIT_MEMLOCK ({memlock_text()}); lower "
                "Ring(zc_budget=...) or raise the limit"))
        if kind == ll.ERR_STALL:
            return op_error(-err, f"{self.mode} transfer", self.sock_fd)
        fd = self.file_fd if x.err_on_file else self.sock_fd
        return op_error(-err, ll.opcode_name(x.err_opcode).lower(), fd)

    @property
    def events(self):
        """The timeline: one ``Event`` per chunk sent, queued or released, in the order handled."""
        x = self._x
        have = len(self._events)
        n = x.nevents
        if have < n:
            src = x.events
            self._events.extend(Event(_KINDS[e.kind], None if e.offset < 0 else e.offset, e.nbytes,
                                      _COPIED[e.copied], e.t_ns) for e in (src[i] for i in range(have, n)))
        return self._events

    # --- driving -------------------------------------------------------------------------------
    def wait(self, timeout=None):
        """Block until the transfer ends; returns bytes of the file sent, or raises its error."""
        x = self._x
        if not x.done:
            self.ring._drive(lambda: x.done, timeout)
        if self.on_release is not None:
            self._released()  # releases found while the ring ran for other transfers
        if self._callback_error is not None:
            raise self._callback_error
        if x.error:
            raise self.error
        return x.sent

    def wait_released(self, timeout=None):
        """Block until every buffer or page this transfer used has been released by the kernel."""
        if self.mode == "splice":
            raise ReleaseNotReported(
                "splice mode hands page-cache pages to the socket by reference and the kernel never "
                "reports when it drops them; use mode='zerocopy', 'mmap' or 'copy' for release events")
        x = self._x
        if not x.settled:
            self.ring._drive(lambda: x.settled, timeout)
        if self.on_release is not None:
            self._released()
        if self._callback_error is not None:
            raise self._callback_error
        if x.error:
            raise self.error
        return x.sent

    def cancel(self):
        """Ask the kernel to stop this transfer. Buffers stay held until their release arrives."""
        if not self._x.done:
            self.ring._cancel(self)

    # --- views ---------------------------------------------------------------------------------
    @property
    def short(self):
        """True when the transfer ended without error before ``count`` bytes (the file shrank)."""
        return self.done and self.error is None and self.sent < self.count

    def released_bytes(self):
        return sum(e.nbytes for e in self.events if e.kind == RELEASED and e.offset is not None)

    def __repr__(self):
        state = "settled" if self.settled else "done" if self.done else "running"
        error = self.error
        return (f"<Transfer {self.mode} fd {self.file_fd}->{self.sock_fd} {self.sent}/{self.count} "
                f"bytes {state}{' error=' + repr(error) if error else ''}>")

    # --- ring side -----------------------------------------------------------------------------
    def _released(self):
        """Hand the RELEASED events not yet seen to ``on_release``; a raising callback is kept and
        raised from wait(), never into the reaper."""
        callback = self.on_release
        if callback is None:
            return
        events = self.events
        while self._fired < len(events):
            ev = events[self._fired]
            self._fired += 1
            if ev.kind == RELEASED and self._callback_error is None:
                try:
                    callback(ev)
                except Exception as exc:  # noqa: BLE001 - raised from wait()
                    self._callback_error = exc

    def _event(self, kind, offset, nbytes, copied, t_ns):
        """Record an event of a Python-run transfer (``State``)."""
        ev = Event(kind, offset, nbytes, copied, t_ns)
        self._events.append(ev)
        self._x.nevents += 1
        if kind == RELEASED:
            self._released()
