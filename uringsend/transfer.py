"""Transfer: the caller's handle on one file-to-socket send, and its timeline of events.

A Transfer behaves as a ``concurrent.futures.Future`` whose result is the number of file bytes
sent (``done()``, ``result()``, ``exception()``, ``cancel()``, ``add_done_callback()``), plus what
only uringsend knows: when the kernel let go of the data (``released()``,
``add_release_callback()``, ``events``).

The transfer's state lives in the C engine (``struct us_xfer``); the handle reads it there and
turns the timeline into ``Event`` tuples only when someone asks for them. The handle refers to the
ring's driver, never the other way round (the driver keeps a listener only for handles with
callbacks, until they settle), so dropping a handle frees it at once and the transfer still runs.
Waiting drives the ring: a transfer advances only while its ring is driven (a wait, a poll, the
event loop).
"""
import errno
import logging
import os
from typing import NamedTuple, Optional

from . import _lowlevel as ll
from .errors import ReleaseNotReported, TransferCancelled, fd_name, memlock_text, op_error

SENT = "sent"          # the socket accepted these bytes
RELEASED = "released"  # the kernel no longer references the memory those bytes came from
QUEUED = "queued"      # handed to the socket by reference (splice); no release will follow
_KINDS = {ll.SENT: SENT, ll.RELEASED: RELEASED, ll.QUEUED: QUEUED}
_COPIED = {-1: None, 0: False, 1: True}
_log = logging.getLogger("uringsend")


class Event(NamedTuple):
    kind: str
    offset: Optional[int]   # file offset of the chunk; None for the header or trailer
    nbytes: int
    copied: Optional[bool]  # for RELEASED: the kernel copied the bytes (True) or sent the pages (False)
    t_ns: int               # time.perf_counter_ns() when the completion was handled


class Transfer:
    """One file (range) sent to one socket. Returned at once by ``Ring.sendfile``.

    As a future: ``result()`` is the number of file bytes sent (headers and trailers not counted),
    or raises the transfer's error. ``sent`` counts the file bytes the socket accepted so far, in
    order; ``header_sent``/``trailer_sent`` those of the headers and trailers.
    """

    __slots__ = ("mode", "sock_fd", "file_fd", "_driver", "_x", "_count", "_events", "_error",
                 "_release_callbacks", "_done_callbacks", "_settled_callbacks", "_callback_error",
                 "_fallback", "_cancel_asked", "__weakref__")

    def __init__(self, driver, x, mode, sock_fd, file_fd, count, on_release):
        self._driver = driver       # drives the ring
        self._x = x                 # struct us_xfer: the engine's state of this transfer
        self.mode = mode
        self.sock_fd = sock_fd      # the caller's fds, for error texts and repr
        self.file_fd = file_fd      # None when the file was given by path
        self._count = count         # as asked; None: to the end of the file
        self._events = []
        self._error = None
        self._release_callbacks = None  # [[fn, events handed to it so far], ...]
        self._done_callbacks = None
        self._settled_callbacks = None
        self._callback_error = None
        self._fallback = None
        self._cancel_asked = False
        if on_release is not None:
            self._release_callbacks = [[on_release, 0]]

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

    @property
    def trailer_len(self):
        return self._x.trailer_len

    # --- state ---------------------------------------------------------------------------------
    @property
    def sent(self):
        return self._x.sent

    @property
    def header_sent(self):
        return self._x.header_sent

    @property
    def trailer_sent(self):
        return self._x.trailer_sent

    @property
    def stranded(self):
        """Bytes found left in a pipe after a broken chain (drained, and sent again from the file)."""
        return self._x.stranded

    def done(self):
        """True once no more bytes will be sent (finished, failed or cancelled)."""
        return bool(self._x.done)

    def running(self):
        return not self._x.done

    def settled(self):
        """True once done and nothing the kernel held for this transfer is outstanding: every
        buffer, page and pipe it used is released (in mode 'splice' the kernel does not say when
        the socket drops the pages it was handed; see ``released()``)."""
        return bool(self._x.settled)

    def cancelled(self):
        """True when the transfer ended because it was cancelled."""
        return bool(self._x.done) and self._x.error != 0 and self._x.err_kind == ll.ERR_CANCELLED

    @property
    def started_ns(self):
        return self._x.started_ns

    @property
    def released_ns(self):
        """``time.perf_counter_ns()`` of the latest release so far (None before the first): for
        a settled transfer in a releasing mode, when the kernel let go of its last chunk."""
        return self._x.released_ns or None

    @property
    def fallback(self):
        """Why the transfer sends differently from how its mode first chose, or None."""
        if self._fallback is None and self._x.fallback:
            self._fallback = "SEND_ZC is not supported on this socket (EOPNOTSUPP): copying sends"
        return self._fallback

    @property
    def error(self):
        """The exception the transfer ended with, or None (without waiting; see ``exception()``)."""
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

    # --- waiting (drives the ring) -------------------------------------------------------------
    def result(self, timeout=None):
        """Wait until the transfer ends (at most ``timeout`` s, then TimeoutError; the transfer
        goes on). Returns the number of file bytes sent, or raises the transfer's error
        (``TransferCancelled`` if it was cancelled before its last byte) or what a release
        callback raised."""
        x = self._x
        if not x.done:
            self._driver.run_until(lambda: x.done, timeout)
        if self._release_callbacks:
            self._fire_releases()  # releases found while the ring ran for other transfers
        if self._callback_error is not None:
            raise self._callback_error
        if x.error:
            raise self.error
        return x.sent

    def exception(self, timeout=None):
        """Wait until the transfer ends; returns its error or None. Like a future's, it raises
        ``TransferCancelled`` (a ``concurrent.futures.CancelledError``) if it was cancelled."""
        x = self._x
        if not x.done:
            self._driver.run_until(lambda: x.done, timeout)
        if self.cancelled():
            raise self.error
        return self.error

    def released(self, timeout=None):
        """Wait until the kernel released everything this transfer used (``settled()``); returns
        the number of file bytes released. Only then may the file's range be changed without the
        peer seeing the change, or a buffer reused. The transfer's own error is ``result()``'s to
        raise; this raises only what a release callback raised, TimeoutError, or
        ``ReleaseNotReported`` in mode 'splice', where the kernel never says when the socket drops
        the page-cache pages it was handed."""
        if self.mode == "splice":
            raise ReleaseNotReported(
                "splice mode hands page-cache pages to the socket by reference and the kernel never "
                "reports when it drops them; use mode='zerocopy', 'mmap' or 'copy' for release events")
        x = self._x
        if not x.settled:
            self._driver.run_until(lambda: x.settled, timeout)
        if self._release_callbacks:
            self._fire_releases()
        if self._callback_error is not None:
            raise self._callback_error
        return x.released

    def cancel(self):
        """Ask the kernel to stop this transfer. Returns False if it was already done, else True
        (a transfer whose last bytes were already on their way may still finish whole: see
        ``cancelled()``). Buffers stay held until the kernel releases them."""
        if self._x.done:
            return False
        if not self._cancel_asked:
            self._cancel_asked = True
            self._driver.cancel(self._x)
        return True

    # --- callbacks (run on the thread driving the ring, while it is driven) ---------------------
    def add_done_callback(self, fn):
        """Call ``fn(transfer)`` once the transfer is done (at once if it is). As with futures,
        an exception raised by ``fn`` is logged and ignored."""
        self._add_once("_done_callbacks", self._x.done, fn)

    def add_settled_callback(self, fn):
        """Call ``fn(transfer)`` once the transfer is settled (at once if it is): every release
        it will ever report has been. Exceptions are logged and ignored."""
        self._add_once("_settled_callbacks", self._x.settled, fn)

    def add_release_callback(self, fn):
        """Call ``fn(event)`` for each RELEASED event, those already recorded first. An
        exception raised by ``fn`` stops its calls and is raised by ``result()``/``released()``."""
        if not callable(fn):
            raise TypeError("a release callback must be callable")
        if self._release_callbacks is None:
            self._release_callbacks = []
        self._release_callbacks.append([fn, 0])
        self._fire_releases()
        if not self._x.settled:
            self._watch()

    def _add_once(self, slot, ready, fn):
        """Add ``fn`` to the one-shot callbacks in ``slot``, or call it now if ``ready``."""
        if ready:
            _call(fn, self)
            return
        callbacks = getattr(self, slot)
        if callbacks is None:
            callbacks = []
            setattr(self, slot, callbacks)
        callbacks.append(fn)
        self._watch()

    def _run_once(self, slot):
        callbacks = getattr(self, slot)
        if callbacks:
            setattr(self, slot, None)
            for fn in callbacks:
                _call(fn, self)

    def _watch(self):
        self._driver.watch(self._x, self._changed)

    def _changed(self, what):
        """The driver's listener: fire what this change makes due."""
        if what & (ll.CH_RELEASED | ll.CH_SETTLED):
            self._fire_releases()
        if what & ll.CH_DONE:
            self._run_once("_done_callbacks")
        if what & ll.CH_SETTLED:
            self._run_once("_settled_callbacks")

    def _fire_releases(self):
        """Hand the RELEASED events not yet seen to each release callback; a raising callback is
        kept and raised from result()/released(), never into the reaper."""
        callbacks = self._release_callbacks
        if not callbacks:
            return
        events = self.events
        for entry in callbacks:
            fn, fired = entry
            while fired < len(events) and self._callback_error is None:
                ev = events[fired]
                fired += 1
                if ev.kind == RELEASED:
                    try:
                        fn(ev)
                    except Exception as exc:  # noqa: BLE001 - raised from result()
                        self._callback_error = exc
            entry[1] = fired

    # --- views ---------------------------------------------------------------------------------
    @property
    def short(self):
        """True when the transfer ended without error before ``count`` bytes (the file shrank)."""
        return self.done() and self.error is None and self.sent < self.count

    def released_bytes(self):
        """File bytes released so far."""
        return self._x.released

    def __repr__(self):
        state = "settled" if self.settled() else "done" if self.done() else "running"
        error = self.error
        return (f"<Transfer {self.mode} fd {self.file_fd}->{self.sock_fd} {self.sent}/{self.count} "
                f"bytes {state}{' error=' + repr(error) if error else ''}>")


def _call(fn, transfer):
    try:
        fn(transfer)
    except Exception:  # noqa: BLE001 - as concurrent.futures does
        _log.exception("exception calling callback for %r", transfer)
