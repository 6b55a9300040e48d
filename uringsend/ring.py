"""Ring: one io_uring, its ledger, the chains waiting for SQ room, and the transfers it drives.

Submission and reaping happen only on the thread that created the ring: io_uring requests belong
to the submitting task (its io-wq splices are cancelled when it exits), and the ring is set up with
SINGLE_ISSUER|DEFER_TASKRUN where the kernel accepts them, which makes that a rule.
"""
import collections
import errno
import functools
import os
import threading
import time
import warnings

from . import _lowlevel as ll
from ._args import _close, _dup, _file_fd, _nonneg, _regular_stat, _sock_fd
from .engines import MapEngine, SpliceEngine, ZeroCopyEngine
from .errors import IoUringUnavailable, RingOwnerError
from .ledger import Ledger, Op
from .pools import BufferPool, MappingCache, PipePool
from .tee import TeeEngine
from .transfer import Transfer
from .zc import default_zc_budget, zc_charge

MODES = ("auto", "splice", "zerocopy", "mmap", "copy")
AUTO = "copy"  # the fastest mode that reports releases, at every size measured (README: Benchmark)
WAIT_SLICE_NS = 250_000_000
_F = ll.SETUP_FLAGS
SETUP_ATTEMPTS = (
    _F["SUBMIT_ALL"] | _F["SINGLE_ISSUER"] | _F["DEFER_TASKRUN"],
    _F["SUBMIT_ALL"] | _F["COOP_TASKRUN"],
    0,
)
# Bumped in a forked child: rings created before the fork belong to the parent.
_forks = [0]
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))
# Objects the kernel may still reference after their ring was closed (notifications pending at
# close): kept alive for the life of the process rather than freed or reused.
_kept_alive = []


class _Canceller:
    """Owner of ASYNC_CANCEL ops. A cancel finds only an op the kernel has issued: a link member
    whose turn has come may still sit in deferred task work (DEFER_TASKRUN) until the next enter,
    and then every cancel of the round answers -ENOENT. So a round that found nothing, for a chain
    still in flight, is followed by another one."""

    def __init__(self, ring):
        self.ring = ring
        self.rounds = {}  # engine -> [cancels outstanding, found anything, which]

    def _on_result(self, op, res, now):
        engine = op.keep
        state = self.rounds[engine]
        state[0] -= 1
        if res != -errno.ENOENT:
            state[1] = True
        if state[0] == 0:
            del self.rounds[engine]
            if not state[1] and engine.chain_left:
                self.ring._cancel_ops(engine, state[2])

    def _on_release(self, op, copied, now):
        pass


class Ring:
    """One io_uring driving many transfers from one thread.

    ``buffers`` x ``buffer_size`` is the registered pool used by mode 'zerocopy' (registered on
    first use); ``chunk_size`` is the release granularity of 'mmap'; ``zc_budget`` bounds the bytes
    sent zero-copy from mappings and not yet released (pinned pages count against RLIMIT_MEMLOCK).
    ``close_timeout`` bounds how long ``close()`` waits for outstanding notifications.
    """

    def __init__(self, entries=256, *, cq_entries=0, buffers=16, buffer_size=256 << 10,
                 chunk_size=1 << 20, copy_chunk_size=1 << 20, pipe_size=None, zc_budget=None,
                 max_workers=32, close_timeout=5.0, setup_flags=None, trace=False):
        if not isinstance(entries, int) or not 4 <= entries <= 32768:
            raise ValueError(f"entries must be an int in 4..32768, not {entries!r}")
        for name, value in (("chunk_size", chunk_size), ("copy_chunk_size", copy_chunk_size),
                            ("buffer_size", buffer_size)):
            if not isinstance(value, int) or not 4096 <= value <= (1 << 30):
                raise ValueError(f"{name} must be an int in 4096..2**30, not {value!r}")
        self._owner = threading.get_ident()
        self._pid = os.getpid()
        self._fork = _forks[0]
        self._raw = None
        attempts = SETUP_ATTEMPTS if setup_flags is None else (setup_flags,)
        err = None
        for flags in attempts:
            try:
                self._raw = ll.RawRing(entries, flags, cq_entries)
                break
            except OSError as exc:
                err = exc
                if exc.errno in (errno.ENOSYS, errno.EPERM):
                    raise IoUringUnavailable(exc.errno) from None
        if self._raw is None:
            raise err
        self.setup_flags = [name for name, bit in _F.items() if self._raw.flags & bit]
        self.ledger = Ledger()
        if trace:
            self.ledger.trace = []
        self.pipes = PipePool(pipe_size)
        self.mappings = MappingCache()
        self._buffers_spec = (buffers, buffer_size)
        self._pool = None
        self.chunk_size = chunk_size
        self.copy_chunk_size = copy_chunk_size
        self.zc_budget = zc_budget if zc_budget is not None else default_zc_budget()
        self._zc_pending = 0
        self._zc_waiters = []
        self.close_timeout = close_timeout
        self._backlog = collections.deque()
        self._ready_list = collections.deque()
        self._reaped = collections.deque()  # CQEs taken off the CQ, not yet dispatched
        self._engines = set()   # not settled yet
        self._canceller = _Canceller(self)
        self.transfers_started = 0
        self.kept_alive = 0
        self.sq_full = 0
        if max_workers:
            try:
                self._raw.set_iowq_max_workers(max_workers, max_workers)
            except OSError:
                pass  # older kernels: io-wq stays unbounded

    # ---- context manager ---------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self._raw is None

    @property
    def sq_entries(self):
        return self._raw.sq_entries

    @property
    def cq_entries(self):
        return self._raw.cq_entries

    @property
    def fd(self):
        return self._raw.fd

    def _check_owner(self):
        if self._raw is None:
            raise ValueError("the ring is closed")
        if _forks[0] != self._fork:
            raise RingOwnerError(f"this ring belongs to process {self._pid}; io_uring requests "
                                 "cannot be submitted from a forked child: create a new Ring there")
        if threading.get_ident() != self._owner:
            raise RingOwnerError("a Ring is driven only by the thread that created it (io_uring "
                                 "requests belong to the submitting thread); create one per thread")

    # ---- public API --------------------------------------------------------------------------
    def sendfile(self, sock, file, offset=0, count=None, *, mode="auto", header=b"", on_release=None):
        """Start sending ``count`` bytes (None: to EOF) of ``file`` from ``offset`` to ``sock``.

        Returns a Transfer at once. ``sock``: a connected stream socket or its fd. ``file``: a file
        object, fd or path (opened and closed by the transfer). ``header``: bytes sent first, as one
        stream with the body. ``on_release(event)`` is called for each released chunk.
        """
        self._check_owner()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not isinstance(header, (bytes, bytearray, memoryview)):
            raise TypeError(f"header must be bytes, not {type(header).__name__}")
        if on_release is not None and not callable(on_release):
            raise TypeError("on_release must be callable")
        offset = _nonneg("offset", offset)
        if count is not None:
            count = _nonneg("count", count)
        # The transfer works on its own duplicates of both fds: the caller may close theirs at any
        # time, and a later chain must never reach whatever file or socket reuses the number.
        user_sock = _sock_fd(sock)
        file_fd, user_file = _file_fd(file)
        sock_fd = -1
        try:
            sock_fd = _dup(user_sock)
            st = _regular_stat(file_fd, file)
            size = st.st_size
            if offset > size:
                raise ValueError(f"offset {offset} is past the end of the file ({size} bytes)")
            end = size if count is None else min(size, offset + count)
            chosen = AUTO if mode == "auto" else mode
            transfer = Transfer(self, chosen, user_sock, user_file, offset,
                                count if count is not None else end - offset, len(header), on_release)
            header = bytes(header)
            args = (self, transfer, sock_fd, file_fd, offset, end, header)
            if chosen == "splice":
                engine = SpliceEngine(*args)
            elif chosen == "zerocopy":
                self._buffer_pool()  # registering can fail (ENOMEM under RLIMIT_MEMLOCK): fail here
                engine = ZeroCopyEngine(*args)
            else:
                engine = MapEngine(*args, zerocopy=(chosen == "mmap"), auto=(mode == "auto"), st=st)
        except BaseException:
            _close(file_fd, sock_fd)
            raise
        transfer._cancel = engine.cancel
        self._engines.add(engine)
        self.transfers_started += 1
        engine.pump()
        self._flush()
        return transfer

    def tee(self, file, socks, offset=0, count=None):
        """Send the same file range to every socket in ``socks``, reading the page cache once per
        chunk (IORING_OP_TEE into a pipe per socket). Returns one Transfer per socket, in order.
        Like mode 'splice', the sockets get the pages by reference: events are 'queued' only."""
        self._check_owner()
        socks = list(socks)
        if not socks:
            raise ValueError("tee needs at least one socket")
        offset = _nonneg("offset", offset)
        if count is not None:
            count = _nonneg("count", count)
        user_socks = [_sock_fd(s) for s in socks]
        if len(set(user_socks)) != len(user_socks):
            raise ValueError("tee: the same socket appears twice")
        file_fd, user_file = _file_fd(file)
        sock_fds = []
        try:
            sock_fds.extend(_dup(fd) for fd in user_socks)
            size = _regular_stat(file_fd, file).st_size
            if offset > size:
                raise ValueError(f"offset {offset} is past the end of the file ({size} bytes)")
            end = size if count is None else min(size, offset + count)
            planned = count if count is not None else end - offset
            transfers = [Transfer(self, "splice", fd, user_file, offset, planned, 0) for fd in user_socks]
            engine = TeeEngine(self, transfers, sock_fds, file_fd, offset, end)
        except BaseException:
            _close(file_fd, *sock_fds)
            raise
        for i, t in enumerate(transfers):
            t._cancel = functools.partial(engine.cancel_dest, i)
        self._engines.add(engine)
        self.transfers_started += len(transfers)
        engine.pump()
        self._flush()
        return transfers

    def poll(self, timeout=0):
        """Submit what is queued, reap what has completed (waiting up to ``timeout`` seconds for
        at least one completion; None waits without limit). Returns the number of CQEs handled."""
        self._check_owner()
        self._pump_ready()  # engines readied without a completion (a cancel, a withdrawal)
        self._flush()
        ns = -1 if timeout is None else max(0, int(timeout * 1e9))
        before = len(self._reaped)
        self._reaped.extend(self._raw.reap(1 if ns != 0 else 0, ns))
        handled = len(self._reaped) - before
        if self._reaped:
            self._dispatch(())
            self._flush()  # chains the completions made ready
        return handled

    def wait(self, transfers, timeout=None, released=False):
        """Drive the ring until every transfer is done (``released``: and settled)."""
        transfers = list(transfers)
        if released:
            self._drive(lambda: all(t.settled for t in transfers), timeout)
        else:
            self._drive(lambda: all(t.done for t in transfers), timeout)

    def run_until_complete(self, timeout=None):
        """Drive until every transfer on this ring is done and everything it used is released."""
        self._drive(lambda: not self._engines, timeout)

    def register_eventfd(self, fd):
        """Have the kernel signal eventfd ``fd`` when completions are ready (for event loops)."""
        self._check_owner()
        self._raw.register_eventfd(fd)

    def statistics(self):
        pool = self._pool
        return {
            "setup_flags": self.setup_flags,
            "sq_entries": self._raw.sq_entries if self._raw else 0,
            "cq_entries": self._raw.cq_entries if self._raw else 0,
            "transfers_started": self.transfers_started,
            "transfers_active": len(self._engines),
            "pending_ops": len(self.ledger.awaiting_result()),
            "pending_notifs": self.ledger.pending_notifs,
            "queued_chains": len(self._backlog),
            "sq_full": self.sq_full,
            "completions": self.ledger.completed,
            "notifs": self.ledger.notifs,
            "copied": self.ledger.copied,
            "zerocopy": self.ledger.zerocopy,
            "orphan_cqes": self.ledger.orphans,
            "zc_bytes_unreleased": self._zc_pending,
            "buffers_total": pool.count if pool else 0,
            "buffers_free": pool.free if pool else 0,
            "pipes_created": self.pipes.created,
            "pipes_idle": self.pipes.idle,
            "mappings_created": self.mappings.created,
            "mappings_busy": self.mappings.busy,
            "kept_alive": self.kept_alive,
        }

    def close(self, timeout=None):
        """Cancel what is running, wait (at most ``timeout``, default ``close_timeout``) for every
        outstanding completion and notification, then tear down. Memory the kernel may still
        reference when time runs out is kept alive for the life of the process, never freed."""
        if self._raw is None:
            return
        if _forks[0] != self._fork:
            self._raw = None  # a forked child's copy: the parent owns the kernel side
            return
        self._check_owner()
        timeout = self.close_timeout if timeout is None else timeout
        for engine in list(self._engines):
            if not engine.done:
                engine.cancel()
        try:
            self._drive(lambda: not self._engines and not len(self.ledger), timeout)
        except (TimeoutError, RuntimeError):
            pass  # what is still referenced is kept alive below
        held = self.ledger.ops()
        if held:
            warnings.warn(f"uringsend: ring closed with {len(held)} operations still referencing "
                          "memory; keeping that memory alive", ResourceWarning, stacklevel=2)
            self.kept_alive = len(held)
            self._keep_alive()
        self._raw.close()
        self._raw = None
        if not held and self._pool is not None:
            self._pool.close()
        self.pipes.close()
        self.mappings.close()
        for engine in self._engines:
            # The ring's teardown cancels its requests, so no op can pick up a file by fd any
            # more; kept memory does not need the fd.
            engine.drop_fds()

    def __del__(self):
        if getattr(self, "_raw", None) is not None and _forks[0] == self._fork:
            if len(self.ledger):
                self._keep_alive()
            self._raw.close()
            self._raw = None

    def _keep_alive(self):
        """Keep what in-flight ops may reference alive for the life of the process."""
        _kept_alive.append((self.ledger.ops(), self._pool, list(self._engines)))

    # ---- engine side -------------------------------------------------------------------------
    def _buffer_pool(self):
        if self._pool is None:
            self._pool = BufferPool(self._raw, *self._buffers_spec)
        return self._pool

    def _let_go_buffer(self, index):
        pool = self._pool
        pool.let_go(index)
        if pool.waiters and pool.free:
            for engine in pool.take_waiters():
                self._ready(engine)

    def _reserve_zc(self, engine, n):
        n = zc_charge(n)
        if self._zc_pending and self._zc_pending + n > self.zc_budget:
            if engine not in self._zc_waiters:
                self._zc_waiters.append(engine)
            return False
        self._zc_pending += n
        return True

    def _unreserve_zc(self, n):
        self._zc_pending -= zc_charge(n)
        if self._zc_waiters:
            waiters, self._zc_waiters = self._zc_waiters, []
            for engine in waiters:
                self._ready(engine)

    def _ready(self, engine):
        self._ready_list.append(engine)

    def _settled(self, engine):
        self._engines.discard(engine)

    def _submit_chain(self, ops):
        if len(ops) > self._raw.sq_entries:
            raise ValueError(f"a chain of {len(ops)} ops cannot fit a ring of {self._raw.sq_entries} entries")
        self._backlog.append(ops)

    def _cancel_ops(self, engine, which=None):
        """Cancel an engine's ops (those ``which(op)`` picks, default all): queued chains are
        withdrawn whole, submitted ops get ASYNC_CANCEL (a cancelled link member breaks its chain)."""
        keep = collections.deque()
        withdrawn = []
        for chain in self._backlog:
            mine = chain[0].owner is engine and (which is None or any(which(op) for op in chain))
            (withdrawn.extend(chain) if mine else keep.append(chain))
        self._backlog = keep
        if withdrawn:
            engine._withdrawn(withdrawn)
        if engine in self._canceller.rounds:
            return  # a round is in flight; if it finds nothing it issues the next one
        targets = [op for op in self.ledger.awaiting_result()
                   if op.owner is engine and (which is None or which(op))]
        if targets:
            self._canceller.rounds[engine] = [len(targets), False, which]
            for op in targets:
                self._backlog.append([Op(self._canceller, ll.OP_ASYNC_CANCEL, -1, addr=op.user_data,
                                         role="cancel", keep=engine)])
        self._flush()

    def _flush(self):
        """Submit queued chains, whole chains only, as many as the SQ holds each round."""
        raw = self._raw
        backlog = self._backlog
        ledger = self.ledger
        link = ll.IOSQE_IO_LINK
        while backlog:
            space = raw.sq_space()
            fields = []
            while backlog and len(fields) + len(backlog[0]) <= space:
                chain = backlog.popleft()
                last = len(chain) - 1
                for i, op in enumerate(chain):
                    ledger.add(op)
                    fields.append(op.fields(link if i < last else 0))
            if not fields:
                break
            if backlog:
                self.sq_full += 1  # the next chain waits, whole, for this submission to make room
            prepared = raw.prep(fields)
            assert prepared == len(fields), f"prepared {prepared} of {len(fields)} SQEs"
            raw.submit()

    def _dispatch(self, cqes):
        """Hand reaped CQEs to the ledger, then pump the engines they made ready.

        A Python signal handler may raise (KeyboardInterrupt) at any bytecode. CQEs already taken
        off the CQ exist nowhere else, so an exception raised while they are handled is held
        until every one of them and every ready engine has been dealt with, then re-raised."""
        pending = self._reaped
        pending.extend(cqes)
        now = time.perf_counter_ns()
        dispatch = self.ledger.dispatch_one
        held = None
        while pending or self._ready_list:
            try:
                while pending:
                    dispatch(pending.popleft(), now)
                self._pump_ready()
            except BaseException as exc:  # noqa: B036 - re-raised below, once the work is done
                held = held or exc
        if held is not None:
            raise held

    def _pump_ready(self):
        ready = self._ready_list
        while ready:
            ready.popleft().pump()

    def _drive(self, until, timeout):
        self._check_owner()
        deadline = None if timeout is None else time.monotonic() + timeout
        raw = self._raw
        while True:
            if self._reaped:
                self._dispatch(())
            self._pump_ready()
            self._flush()
            if until():
                return
            if not len(self.ledger):
                raise RuntimeError("uringsend: nothing is in flight, yet the wait cannot end "
                                   f"({self.statistics()})")
            if deadline is None:
                ns = -1
            else:
                ns = int((deadline - time.monotonic()) * 1e9)
                if ns <= 0:
                    raise TimeoutError("uringsend: timed out waiting for completions")
            # Sliced: a signal arriving after the GIL was released but before the kernel wait
            # began only sets Python's flag; its handler must not wait for a completion.
            ns = WAIT_SLICE_NS if ns < 0 else min(ns, WAIT_SLICE_NS)
            try:
                # Reaped CQEs go straight to the ring's queue: a signal handler raising in this
                # loop finds them there on the next call, never in a lost local.
                self._reaped.extend(raw.reap(1, ns))
            except InterruptedError:
                continue  # a signal: its Python handler runs here; then keep waiting
            if self._reaped:
                self._dispatch(())

