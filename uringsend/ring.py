"""Ring: one io_uring and the transfers it drives, from one thread. The public facade.

Three parts, each with one job:

- ``Ring`` (here) checks what callers pass, starts transfers, hands out ``Transfer`` handles,
  reports statistics and decides what closing means;
- ``_driver.Driver`` runs the C engine from the owner thread and routes what each run hands out
  (the wait loop ``result()``, ``released()`` and ``poll()`` share);
- ``resources.Resources`` decides the sizes and budgets the engine runs with (pipes, the
  registered buffer pool, the zero-copy budget, file mappings, registered file slots).

The per-transfer work (chains, submission, reaping, what each CQE means, buffers, pipes, the
zero-copy budget, the timeline) runs in the C engine (``_core.c``, wrapped by ``_lowlevel.Core``).
"""
import _socket
import errno
import os
import socket
import warnings
import weakref
from dataclasses import asdict, dataclass, fields

from . import _lowlevel as ll
from ._args import _nonneg, _sock_fd
from ._driver import Driver, _forks, _get_ident
from .errors import IoUringUnavailable
from .ledger import Ledger
from .resources import Resources
from .trace import entries as trace_entries
from .transfer import Transfer

MODES = ("auto", "splice", "zerocopy", "mmap", "copy")
AUTO = "copy"  # the fastest mode that reports releases, at every size measured (README: Benchmark)
_F = ll.SETUP_FLAGS
SETUP_ATTEMPTS = (
    _F["SUBMIT_ALL"] | _F["SINGLE_ISSUER"] | _F["DEFER_TASKRUN"],
    _F["SUBMIT_ALL"] | _F["COOP_TASKRUN"],
    0,
)
_CODES = {mode: ll.MODE_CODES[AUTO if mode == "auto" else mode] for mode in MODES}
_ZEROCOPY = ll.MODE_CODES["zerocopy"]
_us_start, _NULL, _gc, _xfer_put = ll.xfer_start, ll.NULL, ll.gc, ll.xfer_put
_SOCKET = socket.socket
_STREAM = int(socket.SOCK_STREAM)
_socket_type = _socket.socket.type.__get__
# Engines whose ring was closed while the kernel may still reference their memory: kept for the
# life of the process rather than freed or reused.
_kept_alive = []


@dataclass(frozen=True)
class RingStatistics:
    """A snapshot of one ring's counters (``Ring.statistics()``)."""

    setup_flags: tuple
    sq_entries: int
    cq_entries: int
    transfers_started: int      # since the ring was made
    transfers_active: int       # not yet settled
    transfers_running: int      # not yet done
    pending_ops: int            # operations the kernel owes a completion for
    pending_notifs: int         # SEND_ZC notifications still to come
    sq_full: int                # times a chain waited for submission-queue room
    completions: int
    notifs: int
    copied: int                 # notifications saying the kernel copied the data
    zerocopy: int               # notifications saying the kernel sent the pages themselves
    orphan_cqes: int
    zc_bytes_unreleased: int    # bytes pinned by zero-copy sends from mappings, not yet released
    buffers_total: int
    buffers_free: int
    pipes_created: int
    pipes_idle: int
    mappings_created: int
    mappings_busy: int
    fixed_files: int            # fds installed in the registered file table
    fds_duplicated: int         # fds duplicated because the table was full
    enters: int                 # io_uring_enter system calls
    kept_alive: int             # operations whose memory a close kept alive

    def __str__(self):
        return "\n".join(f"{f.name}: {getattr(self, f.name)}" for f in fields(self))

    def asdict(self):
        return asdict(self)


def _joined(name, value):
    """Header or trailer bytes: a bytes-like object or a sequence of them, joined."""
    if type(value) is bytes:
        return value
    if value is None:
        return b""
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        try:
            return b"".join(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be a bytes-like object or a sequence of them, not "
                    f"{type(value).__name__}")


class Ring:
    """One io_uring driving many transfers from one thread.

    ``buffers`` x ``buffer_size`` is the registered pool used by mode 'zerocopy' (registered on
    first use); ``chunk_size`` is the release granularity of 'mmap'; ``zc_budget`` bounds the bytes
    sent zero-copy from mappings and not yet released (pinned pages count against RLIMIT_MEMLOCK).
    ``close_timeout`` bounds how long closing waits for outstanding notifications.

    ``with Ring() as ring:`` -- leaving the block normally finishes every transfer still running
    (as ``ThreadPoolExecutor`` does); leaving it with an exception cancels them (as
    ``asyncio.TaskGroup`` does). Either way no memory is freed while the kernel may reference it.
    """

    def __init__(self, entries=256, *, cq_entries=0, buffers=16, buffer_size=256 << 10,
                 chunk_size=1 << 20, copy_chunk_size=1 << 20, pipe_size=None, zc_budget=None,
                 max_workers=32, close_timeout=5.0, setup_flags=None, trace=False):
        if not isinstance(entries, int) or not 4 <= entries <= 32768:
            raise ValueError(f"entries must be an int in 4..32768, not {entries!r}")
        self._resources = Resources.from_options(buffers, buffer_size, chunk_size, copy_chunk_size,
                                                 pipe_size, zc_budget)
        core = None
        attempts = SETUP_ATTEMPTS if setup_flags is None else (setup_flags,)
        err = None
        for flags in attempts:
            try:
                core = ll.Core(entries, flags, cq_entries, self._resources.file_slots)
                break
            except OSError as exc:
                err = exc
                if exc.errno in (errno.ENOSYS, errno.EPERM):
                    raise IoUringUnavailable(exc.errno) from None
        if core is None:
            raise err
        self._core = core
        self._ptr = core.ptr
        self.setup_flags = tuple(name for name, bit in _F.items() if core.flags & bit)
        self._resources.apply(core)
        self._pool_ready = False
        self.close_timeout = close_timeout
        self.ledger = Ledger(core)        # raw ops (kernel-fact tests)
        self._driver = Driver(core, self.ledger)
        self._trace_handles = weakref.WeakValueDictionary() if trace else None
        self.kept_alive = 0
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

    def __exit__(self, exc_type, exc, tb):
        self.close(cancel=exc_type is not None)

    @property
    def closed(self):
        return self._core is None

    @property
    def driver(self):
        """The ``Driver`` running this ring's engine (for event-loop integrations)."""
        return self._driver

    @property
    def chunk_size(self):
        return self._resources.chunk_size

    @property
    def copy_chunk_size(self):
        return self._resources.copy_chunk_size

    @property
    def zc_budget(self):
        return self._resources.zc_budget

    @property
    def sq_entries(self):
        return self._core.sq_entries

    @property
    def cq_entries(self):
        return self._core.cq_entries

    @property
    def fd(self):
        return self._core.fd

    # ---- starting transfers ------------------------------------------------------------------
    def sendfile(self, sock, file, offset=0, count=None, *, mode="auto", headers=None,
                 trailers=None, on_release=None, header=None):
        """Start sending ``count`` bytes (None: to EOF) of ``file`` from ``offset`` to ``sock``.

        Returns a Transfer at once. ``sock``: a connected stream socket or its fd. ``file``: a file
        object, fd or path (opened and closed by the transfer); its position is neither used nor
        changed. ``headers``/``trailers``: bytes (or a sequence of bytes) sent before and after
        the file's range, as one stream with it (``header`` is a synonym of ``headers``).
        ``on_release(event)`` is called for each released chunk (``add_release_callback``).

        The transfer holds the socket and the file on its own (in the ring's registered file table,
        or as duplicates): the caller may close theirs as soon as this returns.
        """
        driver = self._driver
        if self._core is None or _get_ident() != driver.owner or _forks[0] != driver.fork:
            driver.check()
        code = _CODES.get(mode) if type(mode) is str else None
        if code is None:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if header is not None:
            if headers is not None:
                raise TypeError("pass headers= or its synonym header=, not both")
            headers = header
        head = _joined("headers", headers)
        tail = _joined("trailers", trailers)
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
            if _socket_type(sock) != _STREAM:  # the C getter: .type builds an enum per call
                raise ValueError("only SOCK_STREAM type sockets are supported")
        else:
            sock_fd = _sock_fd(sock)
        if code == _ZEROCOPY and not self._pool_ready:
            self._register_pool()  # registering can fail (ENOMEM under RLIMIT_MEMLOCK): fail here
        file_fd, user_file, opened = _file_fd(file)
        watch = on_release is not None
        try:
            x = _us_start(self._ptr, code, sock_fd, file_fd, offset, -1 if count is None else count,
                          head + tail if tail else head, len(head), len(tail), watch)
        finally:
            if opened:
                os.close(file_fd)  # the transfer installed, mapped or duplicated it already
        if x == _NULL:
            _start_failed(self._core, file, file_fd, offset)
        x = _gc(x, _xfer_put)
        transfer = Transfer(driver, x, AUTO if mode == "auto" else mode, sock_fd, user_file, count, on_release)
        if watch:
            driver.watch(x, transfer._changed)
            if x.nevents:
                transfer._fire_releases()
        if self._trace_handles is not None:
            self._trace_handles[x.id] = transfer
        return transfer

    def tee(self, socks, file, offset=0, count=None):
        """Send the same range of ``file`` to every socket in ``socks``, reading the page cache
        once per chunk (IORING_OP_TEE into a pipe per socket). Returns one Transfer per socket, in
        order. Like mode 'splice', the sockets get the pages by reference: events are 'queued'
        only. Each socket has its own position: one that fails or is cancelled drops out alone."""
        self._driver.check()
        if isinstance(socks, (socket.socket, int)) or not hasattr(socks, "__iter__"):
            raise TypeError(f"tee(socks, file, ...): socks must be a sequence of sockets, not "
                            f"{type(socks).__name__}")
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
        transfers = [Transfer(self._driver, x, "splice", fd, user_file, count, None)
                     for x, fd in zip(xs, sock_fds)]
        if self._trace_handles is not None:
            for x, t in zip(xs, transfers):
                self._trace_handles[x.id] = t
        return transfers

    # ---- driving -----------------------------------------------------------------------------
    def poll(self, timeout=0):
        """Submit what is queued, handle what has completed (waiting up to ``timeout`` seconds for
        at least one completion; None waits without limit). Returns the number of CQEs handled."""
        return self._driver.poll(timeout)

    def wait(self, transfers, timeout=None, released=False):
        """Drive the ring until every transfer is done (``released``: and settled)."""
        transfers = list(transfers)
        if released:
            self._driver.run_until(lambda: all(t.settled() for t in transfers), timeout)
        else:
            self._driver.run_until(lambda: all(t.done() for t in transfers), timeout)

    def run_until_complete(self, timeout=None):
        """Drive until every transfer on this ring is done and everything it used is released."""
        self._driver.run_until(self._driver.idle, timeout)

    def register_eventfd(self, fd):
        """Have the kernel signal eventfd ``fd`` when completions are ready (for event loops)."""
        self._driver.check()
        self._core.register_eventfd(fd)

    def statistics(self):
        """A ``RingStatistics`` snapshot (all zeros but ``kept_alive`` once closed)."""
        core = self._core
        st = core.statistics() if core is not None else {}
        get = st.get
        return RingStatistics(
            setup_flags=self.setup_flags,
            sq_entries=core.sq_entries if core else 0,
            cq_entries=core.cq_entries if core else 0,
            transfers_started=get("transfers_started", 0),
            transfers_active=get("transfers_active", 0),
            transfers_running=get("transfers_running", 0),
            pending_ops=get("ops_in_flight", 0),
            pending_notifs=get("pending_notifs", 0),
            sq_full=get("sq_full", 0),
            completions=get("completions", 0),
            notifs=get("notifs", 0),
            copied=get("copied", 0),
            zerocopy=get("zerocopy", 0),
            orphan_cqes=get("orphan_cqes", 0),
            zc_bytes_unreleased=get("zc_bytes_unreleased", 0),
            buffers_total=get("buffers_total", 0),
            buffers_free=get("buffers_free", 0),
            pipes_created=get("pipes_created", 0),
            pipes_idle=get("pipes_idle", 0),
            mappings_created=get("mappings_created", 0),
            mappings_busy=core.mappings_busy() if core else 0,
            fixed_files=get("fixed_files", 0),
            fds_duplicated=get("fds_duplicated", 0),
            enters=get("enters", 0),
            kept_alive=self.kept_alive,
        )

    # ---- closing -----------------------------------------------------------------------------
    def close(self, *, cancel=True, timeout=None, release_timeout=None):
        """Close the ring. ``cancel=True`` (the default, and ``with`` left by an exception)
        cancels every transfer still running; ``cancel=False`` (``with`` left normally) lets them
        finish first, waiting without limit unless ``timeout`` is given, after which the rest is
        cancelled. Then it waits (at most ``release_timeout`` s, default ``close_timeout``) for
        every outstanding completion and notification, and tears down. Memory the kernel may
        still reference when time runs out is kept alive for the life of the process, never
        freed (a ResourceWarning says so)."""
        core = self._core
        if core is None:
            return
        driver = self._driver
        if driver.forked():
            self._core = driver.core = None  # a forked child's copy: the parent owns the kernel side
            return
        driver.check()
        try:
            if not cancel:
                try:
                    driver.run_until(lambda: not core.stats.transfers_running, timeout)
                except TimeoutError:
                    pass  # what is still running is cancelled below
            core.cancel_all()
            try:
                driver.run_until(driver.idle, self.close_timeout if release_timeout is None
                                 else release_timeout)
            except TimeoutError:
                pass  # what is still referenced is kept alive below
            if core.changes_pending():
                driver.flush()  # release callbacks still due
        finally:
            held = core.close()
            self._core = driver.core = None
            if held or len(self.ledger):
                warnings.warn(f"uringsend: ring closed with {held} operations still referencing "
                              "memory; keeping that memory alive", ResourceWarning, stacklevel=2)
                self.kept_alive = held
                _kept_alive.append((core, self.ledger.ops()))
            driver.watched.clear()

    def __del__(self):
        core = getattr(self, "_core", None)
        driver = getattr(self, "_driver", None)
        if core is not None and driver is not None and not driver.forked() and (core.busy() or len(self.ledger)):
            _kept_alive.append((core, self.ledger.ops()))

    # ---- resources, trace --------------------------------------------------------------------
    def _register_pool(self):
        """Register the zero-copy buffer pool (once)."""
        if not self._pool_ready:
            self._resources.register_pool(self._core)
            self._pool_ready = True

    def trace(self):
        """Every CQE handled so far (``Ring(trace=True)``), oldest first, as ``TraceEntry``."""
        return trace_entries(self._trace_handles, self._core_trace())

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
        self._driver.check()
        return send(self, sock, data, mode=mode, on_release=on_release)

    def stream(self, sock, size=1 << 20, *, mode="zerocopy"):
        """A ``StreamWriter`` to ``sock`` on a registered circular buffer of ``size`` bytes, sent
        with SEND_ZC ('zerocopy'), SEND ('copy'), or SEND_ZC until the kernel reports that it
        copies anyway ('auto'). See docs/streams.md."""
        from .stream import StreamWriter
        self._driver.check()
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
