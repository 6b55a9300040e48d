"""Driving the C engine: the wait loop, and routing what each run hands out.

One ``Driver`` per ring. It is the interface between the engine's Python wrapper
(``_lowlevel.Core``) and everything that waits on or listens to transfers: ``Transfer`` (its
``result()``/``released()`` waits, ``cancel()``, and ``watch`` for its callbacks) and ``Ring``
(poll, close). Each engine run (``Core.run``) submits, reaps and advances every
transfer, and returns a batch of changes, only for transfers that asked to be told (``watch``:
their handle has callbacks) and for raw ops.

Submission and reaping happen only on the thread that created the ring: io_uring requests belong
to the submitting task (its io-wq work is cancelled when it exits), and a ring set up with
SINGLE_ISSUER|DEFER_TASKRUN makes that a kernel rule. Work progresses only while the ring is
driven: with DEFER_TASKRUN the kernel runs a ring's completions only inside its owner's
io_uring_enter, so a transfer left alone while its caller blocks elsewhere waits after its first
step [KF 22].
"""
import os
import threading
import time

from . import _lowlevel as ll
from .errors import RingOwnerError

WAIT_SLICE_NS = 250_000_000
_get_ident = threading.get_ident
# Bumped in a forked child: rings created before the fork belong to the parent.
_forks = [0]
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class EngineStalled(RuntimeError):
    """Nothing is in flight in the kernel, yet a wait cannot end: an engine bug, never expected."""


class Driver:
    """Runs one engine (``core``) from its owner thread and routes its changes."""

    def __init__(self, core, ledger):
        self.core = core               # None once closed
        self.ledger = ledger           # raw ops (kernel-fact tests)
        self.watched = {}              # transfer id -> listener(what), until the transfer settles
        self.owner = _get_ident()
        self.pid = os.getpid()
        self.fork = _forks[0]

    # ---- ownership -------------------------------------------------------------------------
    def forked(self):
        return _forks[0] != self.fork

    def check(self):
        """Raise unless the calling thread may drive this engine now."""
        if self.core is not None and _get_ident() == self.owner and _forks[0] == self.fork:
            return
        if self.core is None:
            raise ValueError("the ring is closed")
        if _forks[0] != self.fork:
            raise RingOwnerError(f"this ring belongs to process {self.pid}; io_uring requests "
                                 "cannot be submitted from a forked child: create a new Ring there")
        raise RingOwnerError("a Ring is driven only by the thread that created it (io_uring "
                             "requests belong to the submitting thread); create one per thread")

    # ---- what transfers and listeners ask of it ---------------------------------------------
    def watch(self, x, listener):
        """Call ``listener(what)`` (``CH_*`` bits) for each change of transfer ``x`` (a
        ``struct us_xfer``) from now on, until it settles."""
        if not x.notify:
            x.notify = 1
        if not x.settled:
            self.watched[x.id] = listener

    def cancel(self, x):
        self.check()
        self.core.cancel(x)

    def idle(self):
        """No transfer running, no operation or notification outstanding, no raw op waiting."""
        core = self.core
        return not core.stats.transfers_active and not core.busy() and not len(self.ledger)

    # ---- running the engine ----------------------------------------------------------------
    def poll(self, timeout=0):
        """One engine run, waiting up to ``timeout`` s (None: without limit) for a completion.
        Returns the number of CQEs handled."""
        self.check()
        ns = -1 if timeout is None else max(0, int(timeout * 1e9))
        st = self.core.stats
        before = st.completions + st.notifs + st.orphan_cqes
        n = self.core.run(1 if ns != 0 else 0, ns)
        if n:
            self.dispatch(n)
        if self.core.changes_pending():
            self.flush()  # a batch holds at most 256 changes: hand out the rest now
        return st.completions + st.notifs + st.orphan_cqes - before

    def run_until(self, until, timeout):
        """Run the engine until ``until()`` is true; TimeoutError after ``timeout`` s."""
        if self.core is None or _get_ident() != self.owner or _forks[0] != self.fork:
            self.check()
        core = self.core
        run = core.run
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if until():
                if core.changes_pending():
                    self.flush()
                return
            if deadline is None:
                ns = WAIT_SLICE_NS
            else:
                ns = int((deadline - time.monotonic()) * 1e9)
                if ns <= 0:
                    raise TimeoutError("uringsend: timed out waiting for completions")
                # Sliced: a signal arriving after the GIL was released but before the kernel wait
                # began only sets Python's flag; its handler must not wait for a completion.
                ns = min(ns, WAIT_SLICE_NS)
            try:
                n = run(1, ns)
            except InterruptedError:
                continue  # a signal: its Python handler runs here; then keep waiting
            if n:
                self.dispatch(n)
            elif not until() and not core.busy():
                raise EngineStalled("uringsend: nothing is in flight, yet the wait cannot end "
                                    f"({core.statistics()})")

    def flush(self):
        """Hand out every change the engine holds (found while starting transfers, or more than
        one batch holds)."""
        core = self.core
        while core.changes_pending():
            try:
                n = core.run(0, 0)
            except InterruptedError:
                return  # handed out by the next run
            if not n:
                return
            self.dispatch(n)

    def dispatch(self, n):
        """Route one batch of changes: raw CQEs to their ops' owners, transfer changes to the
        handles that asked for them.

        A Python signal handler may raise (KeyboardInterrupt) at any bytecode. The batch lives
        in the engine's buffer until the next run, so an exception raised while it is handled is
        held until every entry has been dealt with, then re-raised."""
        changes = self.core.changes
        watched = self.watched
        now = time.perf_counter_ns()
        i = 0
        held = None
        while i < n:
            try:
                while i < n:
                    ch = changes[i]
                    i += 1
                    what = ch.what
                    if what & ll.CH_RAW:
                        self.ledger.dispatch(ch.id, ch.res, ch.flags, now)
                        continue
                    listener = watched.get(ch.id)
                    if listener is None:
                        continue
                    if what & ll.CH_SETTLED:
                        del watched[ch.id]
                    listener(what)
            except BaseException as exc:  # noqa: B036 - re-raised below, once the work is done
                held = held or exc
        self.core.acked = True
        if held is not None:
            raise held
