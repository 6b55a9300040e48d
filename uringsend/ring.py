"""Ring: one io_uring and the transfers it drives, from one thread.

The per-transfer work (chains, submission, reaping, what each CQE means, buffers, pipes, the
zero-copy budget, the timeline) runs in the C engine (``_core.c``, wrapped by
``_lowlevel.Core``). This module checks arguments, owns the policy for file mappings, hands out
``Transfer`` handles and drives the engine: one call per wait step, which returns only the changes
of transfers that asked to be told (callbacks, asyncio waiters).

Submission and reaping happen only on the thread that created the ring: io_uring requests belong
to the submitting task (its io-wq splices are cancelled when it exits), and the ring is set up with
SINGLE_ISSUER|DEFER_TASKRUN where the kernel accepts them, which makes that a rule.
"""
import errno
import os
import resource
import socket
import threading
import time
import warnings
import weakref

from . import _lowlevel as ll
from ._args import _nonneg, _sock_fd
from .errors import IoUringUnavailable, RingOwnerError
from .ledger import Ledger
from .pools import pipe_max_size
from .trace import entries as trace_entries
from .transfer import Transfer
from .zc import default_zc_budget

MODES = ("auto", "splice", "zerocopy", "mmap", "copy")
AUTO = "copy"  # the fastest mode that reports releases, at every size measured (README: Benchmark)
WAIT_SLICE_NS = 250_000_000
_F = ll.SETUP_FLAGS
SETUP_ATTEMPTS = (
    _F["SUBMIT_ALL"] | _F["SINGLE_ISSUER"] | _F["DEFER_TASKRUN"],
    _F["SUBMIT_ALL"] | _F["COOP_TASKRUN"],
    0,
)
_CODES = {mode: ll.MODE_CODES[AUTO if mode == "auto" else mode] for mode in MODES}
_ZEROCOPY = ll.MODE_CODES["zerocopy"]
_us_start, _NULL, _gc, _xfer_put = ll.xfer_start, ll.NULL, ll.gc, ll.xfer_put
_FILE_SLOTS = 1024  # registered file table (a transfer takes one or two slots while it runs)
_SOCKET = socket.socket
_get_ident = threading.get_ident
# Bumped in a forked child: rings created before the fork belong to the parent.
_forks = [0]
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))
# Engines whose ring was closed while the kernel may still reference their memory: kept for the
# life of the process rather than freed or reused.
_kept_alive = []


def _file_slots():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, min(_FILE_SLOTS, soft if soft != resource.RLIM_INFINITY else _FILE_SLOTS))


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
        if not isinstance(buffers, int) or buffers < 1 or buffer_size % ll.PAGE:
            raise ValueError(f"buffers must be >= 1 and buffer_size a multiple of {ll.PAGE}")
        self._owner = _get_ident()
        self._pid = os.getpid()
        self._fork = _forks[0]
        self._core = None
        attempts = SETUP_ATTEMPTS if setup_flags is None else (setup_flags,)
        err = None
        for flags in attempts:
            try:
                self._core = ll.Core(entries, flags, cq_entries, _file_slots())
                break
            except OSError as exc:
                err = exc
                if exc.errno in (errno.ENOSYS, errno.EPERM):
                    raise IoUringUnavailable(exc.errno) from None
        if self._core is None:
            raise err
        core = self._core
        self._ptr = core.ptr
        self.setup_flags = [name for name, bit in _F.items() if core.flags & bit]
        pipe_size = min(pipe_size or (1 << 20), pipe_max_size())
        self._buffers_spec = (buffers, buffer_size)
        self._pool_ready = False
        self.chunk_size = chunk_size
        self.copy_chunk_size = copy_chunk_size
        self.zc_budget = zc_budget if zc_budget is not None else default_zc_budget()
        # file mappings: up to 64 idle ones cached; files above 16 MiB get one per transfer
        core.configure(chunk_size, copy_chunk_size, self.zc_budget, pipe_size, 16, 64, 16 << 20)
        self.close_timeout = close_timeout
        self.ledger = Ledger(core)        # raw ops (kernel-fact tests)
        self._watched = {}                # transfer id -> Transfer, for those that want changes
        self._on_change = None            # set by uringsend.aio: told of watched transfers done/settled
        self._trace_handles = weakref.WeakValueDictionary() if trace else None
        self.kept_alive = 0
        self._tracing = bool(trace)
        if trace:
            core.set_trace(True)
            self.ledger.trace = []
        if max_workers:
            try:
                core.set_iowq_max_workers(max_workers, max_workers)
            except OSError:
                pass  # older kernels: io-wq stays unbounded

    # ---- context manager ---------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self._core is None

    @property
    def sq_entries(self):
        return self._core.sq_entries

    @property
    def cq_entries(self):
        return self._core.cq_entries

    @property
    def fd(self):
        return self._core.fd

    def _check_owner(self):
        if self._core is None:
            raise ValueError("the ring is closed")
        if _forks[0] != self._fork:
            raise RingOwnerError(f"this ring belongs to process {self._pid}; io_uring requests "
                                 "cannot be submitted from a forked child: create a new Ring there")
        if _get_ident() != self._owner:
            raise RingOwnerError("a Ring is driven only by the thread that created it (io_uring "
                                 "requests belong to the submitting thread); create one per thread")

    # ---- public API --------------------------------------------------------------------------
    def sendfile(self, sock, file, offset=0, count=None, *, mode="auto", header=b"", on_release=None):
        """Start sending ``count`` bytes (None: to EOF) of ``file`` from ``offset`` to ``sock``.

        Returns a Transfer at once. ``sock``: a connected stream socket or its fd. ``file``: a file
        object, fd or path (opened and closed by the transfer). ``header``: bytes sent first, as one
        stream with the body. ``on_release(event)`` is called for each released chunk.

        The transfer holds the socket and the file on its own (in the ring's registered file table,
        or as duplicates): the caller may close theirs as soon as this returns.
        """
        if self._core is None or _get_ident() != self._owner or _forks[0] != self._fork:
            self._check_owner()
        code = _CODES.get(mode) if type(mode) is str else None
        if code is None:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if type(header) is not bytes:
            if not isinstance(header, (bytearray, memoryview)):
                raise TypeError(f"header must be bytes, not {type(header).__name__}")
            header = bytes(header)
        if on_release is not None and not callable(on_release):
            raise TypeError("on_release must be callable")
        if type(offset) is not int or offset < 0:
            offset = _nonneg("offset", offset)
        if count is not None and (type(count) is not int or count < 0):
            count = _nonneg("count", count)
        if type(sock) is _SOCKET:  # known to be a socket: no fstat needed
            sock_fd = sock.fileno()
            if sock_fd < 0:
                raise OSError(errno.EBADF, f"sendfile: socket {sock!r} is closed")
        else:
            sock_fd = _sock_fd(sock)
        if code == _ZEROCOPY and not self._pool_ready:
            self._buffer_pool()  # registering can fail (ENOMEM under RLIMIT_MEMLOCK): fail here
        file_fd, user_file, opened = _file_fd(file)
        watch = on_release is not None
        try:
            x = _us_start(self._ptr, code, sock_fd, file_fd, offset, -1 if count is None else count,
                          header, len(header), watch)
        finally:
            if opened:
                os.close(file_fd)  # the transfer installed, mapped or duplicated it already
        if x == _NULL:
            _start_failed(self._core, file, file_fd, offset)
        x = _gc(x, _xfer_put)
        transfer = Transfer(self, x, AUTO if mode == "auto" else mode, sock_fd, user_file, count, on_release)
        if watch:
            self._watched[x.id] = transfer
            if x.nevents:
                transfer._released()
        if self._trace_handles is not None:
            self._trace_handles[x.id] = transfer
        return transfer

    def tee(self, file, socks, offset=0, count=None):
        """Send the same file range to every socket in ``socks``, reading the page cache once per
        chunk (IORING_OP_TEE into a pipe per socket). Returns one Transfer per socket, in order.
        Like mode 'splice', the sockets get the pages by reference: events are 'queued' only.
        Each socket has its own position: one that fails or is cancelled drops out alone."""
        self._check_owner()
        socks = list(socks)
        if not socks:
            raise ValueError("tee needs at least one socket")
        if 2 * len(socks) > self._core.sq_entries:
            raise ValueError(f"tee to {len(socks)} sockets needs a ring of at least {2 * len(socks)} entries")
        offset = _nonneg("offset", offset)
        if count is not None:
            count = _nonneg("count", count)
        sock_fds = [_sock_fd(s) for s in socks]
        if len(set(sock_fds)) != len(sock_fds):
            raise ValueError("tee: the same socket appears twice")
        file_fd, user_file, opened = _file_fd(file)
        try:
            xs = self._core.tee(file_fd, sock_fds, offset, -1 if count is None else count)
        finally:
            if opened:
                os.close(file_fd)
        if xs is None:
            _start_failed(self._core, file, file_fd, offset)
        transfers = [Transfer(self, x, "splice", fd, user_file, count, None) for x, fd in zip(xs, sock_fds)]
        if self._trace_handles is not None:
            for x, t in zip(xs, transfers):
                self._trace_handles[x.id] = t
        return transfers

    def poll(self, timeout=0):
        """Submit what is queued, handle what has completed (waiting up to ``timeout`` seconds for
        at least one completion; None waits without limit). Returns the number of CQEs handled."""
        self._check_owner()
        ns = -1 if timeout is None else max(0, int(timeout * 1e9))
        st = self._core.stats
        before = st.completions + st.notifs + st.orphan_cqes
        n = self._core.run(1 if ns != 0 else 0, ns)
        if n:
            self._dispatch(n)
        if self._core.changes_pending():
            self._flush_changes()  # a batch holds at most 256 changes: hand out the rest now
        return st.completions + st.notifs + st.orphan_cqes - before

    def wait(self, transfers, timeout=None, released=False):
        """Drive the ring until every transfer is done (``released``: and settled)."""
        transfers = list(transfers)
        if released:
            self._drive(lambda: all(t.settled for t in transfers), timeout)
        else:
            self._drive(lambda: all(t.done for t in transfers), timeout)

    def run_until_complete(self, timeout=None):
        """Drive until every transfer on this ring is done and everything it used is released."""
        self._drive(self._idle, timeout)

    def register_eventfd(self, fd):
        """Have the kernel signal eventfd ``fd`` when completions are ready (for event loops)."""
        self._check_owner()
        self._core.register_eventfd(fd)

    def statistics(self):
        core = self._core
        st = core.statistics() if core is not None else {}
        return {
            "setup_flags": self.setup_flags,
            "sq_entries": core.sq_entries if core else 0,
            "cq_entries": core.cq_entries if core else 0,
            "transfers_started": st.get("transfers_started", 0),
            "transfers_active": st.get("transfers_active", 0),
            "pending_ops": st.get("ops_in_flight", 0),
            "pending_notifs": st.get("pending_notifs", 0),
            "queued_chains": 0,
            "sq_full": st.get("sq_full", 0),
            "completions": st.get("completions", 0),
            "notifs": st.get("notifs", 0),
            "copied": st.get("copied", 0),
            "zerocopy": st.get("zerocopy", 0),
            "orphan_cqes": st.get("orphan_cqes", 0),
            "zc_bytes_unreleased": st.get("zc_bytes_unreleased", 0),
            "buffers_total": st.get("buffers_total", 0),
            "buffers_free": st.get("buffers_free", 0),
            "pipes_created": st.get("pipes_created", 0),
            "pipes_idle": st.get("pipes_idle", 0),
            "mappings_created": st.get("mappings_created", 0),
            "mappings_busy": core.mappings_busy() if core else 0,
            "fixed_files": st.get("fixed_files", 0),
            "fds_duplicated": st.get("fds_duplicated", 0),
            "enters": st.get("enters", 0),
            "kept_alive": self.kept_alive,
        }

    def close(self, timeout=None):
        """Cancel what is running, wait (at most ``timeout``, default ``close_timeout``) for every
        outstanding completion and notification, then tear down. Memory the kernel may still
        reference when time runs out is kept alive for the life of the process, never freed."""
        core = self._core
        if core is None:
            return
        if _forks[0] != self._fork:
            self._core = None  # a forked child's copy: the parent owns the kernel side
            return
        self._check_owner()
        timeout = self.close_timeout if timeout is None else timeout
        core.cancel_all()
        try:
            self._drive(self._idle, timeout)
        except (TimeoutError, RuntimeError):
            pass  # what is still referenced is kept alive below
        if core.changes_pending():
            self._flush_changes()  # on_release callbacks still due
        held = core.close()
        self._core = None
        if held or len(self.ledger):
            warnings.warn(f"uringsend: ring closed with {held} operations still referencing "
                          "memory; keeping that memory alive", ResourceWarning, stacklevel=2)
            self.kept_alive = held
            _kept_alive.append((core, self.ledger.ops()))
        self._watched.clear()

    def __del__(self):
        core = getattr(self, "_core", None)
        if core is not None and _forks[0] == self._fork and (core.busy() or len(self.ledger)):
            _kept_alive.append((core, self.ledger.ops()))

    # ---- driving -----------------------------------------------------------------------------
    def _idle(self):
        core = self._core
        return not core.stats.transfers_active and not core.busy() and not len(self.ledger)

    def _drive(self, until, timeout):
        if self._core is None or _get_ident() != self._owner or _forks[0] != self._fork:
            self._check_owner()
        core = self._core
        run = core.run
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if until():
                if core.changes_pending():
                    self._flush_changes()
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
                self._dispatch(n)
            elif not until() and not core.busy():
                raise RuntimeError("uringsend: nothing is in flight, yet the wait cannot end "
                                   f"({self.statistics()})")

    def _flush_changes(self):
        """Hand out every change the engine holds (found while starting transfers, or more than
        one batch holds)."""
        core = self._core
        while core.changes_pending():
            try:
                n = core.run(0, 0)
            except InterruptedError:
                return  # handed out by the next run
            if not n:
                return
            self._dispatch(n)

    def _dispatch(self, n):
        """Route one batch of changes: raw CQEs to their ops' owners, transfer changes to the
        handles that asked for them.

        A Python signal handler may raise (KeyboardInterrupt) at any bytecode. The batch lives
        in the engine's buffer until the next run, so an exception raised while it is handled is
        held until every entry has been dealt with, then re-raised."""
        changes = self._core.changes
        watched = self._watched
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
                    t = watched.get(ch.id)
                    if t is None:
                        continue
                    if what & ll.CH_RELEASED:
                        t._released()
                    if what & ll.CH_SETTLED:
                        del watched[ch.id]
                    if what & (ll.CH_DONE | ll.CH_SETTLED) and self._on_change is not None:
                        self._on_change(t)
            except BaseException as exc:  # noqa: B036 - re-raised below, once the work is done
                held = held or exc
        self._core.acked = True
        if held is not None:
            raise held

    # ---- Python-run engines (tee) and raw ops ----------------------------------------------
    def _cancel(self, transfer):
        self._check_owner()
        self._core.cancel(transfer._x)

    def _watch(self, transfer):
        """Report this transfer's changes (done, settled) to ``_on_change`` from now on."""
        x = transfer._x
        if x.notify:
            return
        x.notify = 1
        self._watched[x.id] = transfer

    def _buffer_pool(self):
        """Register the zero-copy buffer pool (once)."""
        if self._pool_ready:
            return
        count, size = self._buffers_spec
        ret = self._core.pool(count, size)
        if ret < 0:
            err = -ret
            if err != errno.ENOMEM:
                raise OSError(err, f"io_uring_register_buffers ({count} x {size} bytes): {os.strerror(err)}")
            from .errors import memlock_text
            raise OSError(errno.ENOMEM, (
                f"io_uring_register_buffers ({count} x {size} bytes): {os.strerror(errno.ENOMEM)}: "
                f"registered buffers count against RLIMIT_MEMLOCK ({memlock_text()}); use "
                "Ring(buffers=..., buffer_size=...) to register less, or raise the limit"))
        self._pool_ready = True

    def trace(self):
        """Every CQE handled so far (``Ring(trace=True)``), oldest first, as ``TraceEntry``."""
        return trace_entries(self)

    def _core_trace(self):
        if self._core is not None:
            self._last_trace = self._core.trace()
        return getattr(self, "_last_trace", [])

    # ---- memory sources: send() and stream(), implemented in uringsend.stream ----------------
    def send(self, sock, data, *, mode="auto", on_release=None):
        """Start sending the bytes-like ``data`` (bytes, bytearray, contiguous memoryview, mmap) to
        the stream socket ``sock``; returns a Transfer at once, with ``sent`` and ``released``
        events per chunk (offsets within ``data``). ``mode``: 'zerocopy' (SEND_ZC) or 'copy'
        (SEND; 'auto'). ``data`` stays pinned (a bytearray cannot be resized, an mmap cannot be
        closed) until the transfer settles; writing to it before its release changes what the
        peer may get."""
        from .stream import send
        self._check_owner()
        return send(self, sock, data, mode=mode, on_release=on_release)

    def stream(self, sock, size=1 << 20, *, mode="zerocopy"):
        """A ``StreamWriter`` to ``sock`` on a registered circular buffer of ``size`` bytes, sent
        with SEND_ZC ('zerocopy'), SEND ('copy'), or SEND_ZC until the kernel reports that it
        copies anyway ('auto'). See docs/streams.md."""
        from .stream import StreamWriter
        self._check_owner()
        return StreamWriter(self, sock, size, mode=mode)
    # ---- end of memory sources -------------------------------------------------------------


def _file_fd(file):
    """(fd to start from, the caller's fd or None for a path, whether we opened it). An fd we
    opened is closed once the engine holds the file (it installs, maps or duplicates it)."""
    if type(file) is int:
        return file, file, False
    if isinstance(file, (str, bytes, os.PathLike)):
        return os.open(file, os.O_RDONLY | os.O_CLOEXEC), None, True
    fd = getattr(file, "fileno", lambda: None)()
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"file must be a path, a file object or a file descriptor, not {type(file).__name__}")
    return fd, fd, False


def _start_failed(core, file, fd, offset):
    """Raise what the engine's refusal to start a transfer means."""
    why, err, size = core.start_error()
    if why == ll.START_DIR:
        raise IsADirectoryError(errno.EISDIR, f"sendfile: {file!r} is a directory")
    if why == ll.START_NOT_REGULAR:
        raise OSError(errno.EINVAL, f"sendfile: fd {fd} is not a regular file")
    if why == ll.START_OFFSET:
        raise ValueError(f"offset {offset} is past the end of the file ({size} bytes)")
    if why == ll.START_FSTAT:
        raise OSError(err, f"sendfile: file fd {fd}: {os.strerror(err)}")
    raise OSError(err, f"sendfile: {os.strerror(err)}")
