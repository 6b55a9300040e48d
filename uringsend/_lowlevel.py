"""The only module that touches cffi's ``lib``/``ffi``: validate -> call -> check.

``Core`` wraps the C engine (_core.c): one io_uring and the transfers it drives. Everything above
this module sees Python ints, tuples, exceptions and the ``struct us_xfer`` views it hands out.
"""
import mmap
import os

from ._uring import ffi, lib

IORING_CQE_F_MORE = lib.IORING_CQE_F_MORE
IORING_CQE_F_NOTIF = lib.IORING_CQE_F_NOTIF
IORING_SEND_ZC_REPORT_USAGE = lib.IORING_SEND_ZC_REPORT_USAGE
IORING_NOTIF_USAGE_ZC_COPIED = lib.IORING_NOTIF_USAGE_ZC_COPIED
IOSQE_IO_LINK = lib.IOSQE_IO_LINK
IOSQE_IO_HARDLINK = lib.IOSQE_IO_HARDLINK
IOSQE_CQE_SKIP_SUCCESS = lib.IOSQE_CQE_SKIP_SUCCESS

OP_NOP = lib.IORING_OP_NOP
OP_POLL_ADD = lib.IORING_OP_POLL_ADD
OP_ASYNC_CANCEL = lib.IORING_OP_ASYNC_CANCEL
OP_SEND = lib.IORING_OP_SEND
OP_SPLICE = lib.IORING_OP_SPLICE
OP_TEE = lib.IORING_OP_TEE
OP_SEND_ZC = lib.IORING_OP_SEND_ZC
OP_SEND_ZC_FIXED = lib.US_OP_SEND_ZC_FIXED  # SEND_ZC with IORING_RECVSEND_FIXED_BUF

MODE_CODES = {"splice": lib.US_MODE_SPLICE, "zerocopy": lib.US_MODE_ZEROCOPY,
              "mmap": lib.US_MODE_MMAP, "copy": lib.US_MODE_COPY}
SENT, RELEASED, QUEUED = lib.US_SENT, lib.US_RELEASED, lib.US_QUEUED
ERR_OP, ERR_CANCELLED, ERR_TRUNCATED = lib.US_ERR_OP, lib.US_ERR_CANCELLED, lib.US_ERR_TRUNCATED
ERR_MEMLOCK, ERR_STALL = lib.US_ERR_MEMLOCK, lib.US_ERR_STALL
CH_DONE, CH_SETTLED, CH_RELEASED, CH_RAW = lib.US_CH_DONE, lib.US_CH_SETTLED, lib.US_CH_RELEASED, lib.US_CH_RAW

SETUP_FLAGS = {
    "SUBMIT_ALL": lib.IORING_SETUP_SUBMIT_ALL,
    "COOP_TASKRUN": lib.IORING_SETUP_COOP_TASKRUN,
    "SINGLE_ISSUER": lib.IORING_SETUP_SINGLE_ISSUER,
    "DEFER_TASKRUN": lib.IORING_SETUP_DEFER_TASKRUN,
}

# Kernel opcode numbers (include/uapi/linux/io_uring.h), for probe() output.
OPCODE_NAMES = (
    "NOP", "READV", "WRITEV", "FSYNC", "READ_FIXED", "WRITE_FIXED", "POLL_ADD", "POLL_REMOVE",
    "SYNC_FILE_RANGE", "SENDMSG", "RECVMSG", "TIMEOUT", "TIMEOUT_REMOVE", "ACCEPT",
    "ASYNC_CANCEL", "LINK_TIMEOUT", "CONNECT", "FALLOCATE", "OPENAT", "CLOSE", "FILES_UPDATE",
    "STATX", "READ", "WRITE", "FADVISE", "MADVISE", "SEND", "RECV", "OPENAT2", "EPOLL_CTL",
    "SPLICE", "PROVIDE_BUFFERS", "REMOVE_BUFFERS", "TEE", "SHUTDOWN", "RENAMEAT", "UNLINKAT",
    "MKDIRAT", "SYMLINKAT", "LINKAT", "MSG_RING", "FSETXATTR", "SETXATTR", "FGETXATTR",
    "GETXATTR", "SOCKET", "URING_CMD", "SEND_ZC", "SENDMSG_ZC", "READ_MULTISHOT", "WAITID",
    "FUTEX_WAIT", "FUTEX_WAKE", "FUTEX_WAITV", "FIXED_FD_INSTALL", "FTRUNCATE", "BIND", "LISTEN",
    "RECV_ZC", "EPOLL_WAIT", "READV_FIXED", "WRITEV_FIXED", "PIPE",
)
PAGE = mmap.PAGESIZE
_OUR_NAMES = {OP_SEND_ZC_FIXED: "SEND_ZC_FIXED", lib.US_OP_DUP: "DUP"}
# Roles of the engine's ops in a trace (enum role in _core.c).
ROLES = ("none", "install", "unslot", "poll", "header", "fill", "send", "cancel", "raw", "tee", "trailer")
# The per-transfer fast path, called by Ring directly: us_start(core, mode, sock_fd, file_fd,
# offset, count or -1, header + trailer bytes, header length, trailer length, notify) ->
# struct us_xfer * or NULL (see Core.start_error); the result is owned through ffi.gc(x, xfer_put).
xfer_start = lib.us_start
NULL = ffi.NULL
gc = ffi.gc
xfer_put = lib.us_xfer_put
START_FSTAT, START_DIR, START_NOT_REGULAR = lib.US_START_FSTAT, lib.US_START_DIR, lib.US_START_NOT_REGULAR
START_OFFSET = lib.US_START_OFFSET
STATS = [name for name, _ in ffi.typeof("struct us_stats").fields]


def opcode_name(opcode):
    return _OUR_NAMES.get(opcode) or (OPCODE_NAMES[opcode] if opcode < len(OPCODE_NAMES) else str(opcode))


def _check(ret, what):
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def probe_opcodes():
    """Supported opcode numbers, from IORING_REGISTER_PROBE on a throwaway ring."""
    n = lib.IORING_OP_LAST_KNOWN
    out = ffi.new("unsigned char[]", n)
    _check(lib.us_probe_ops(out, n), "io_uring probe")
    return [i for i in range(n) if out[i]]


def try_setup(entries, flags, cq_entries=0):
    """Set up and immediately tear down a ring: 0 or -errno."""
    return lib.us_try_setup(entries, flags)


class Core:
    """One ``struct us_core``. Methods are called only from the thread that created it (the
    Ring checks); ``xfer_put`` may run on any thread (the reference count is atomic)."""

    def __init__(self, entries, flags, cq_entries=0, file_slots=0):
        err = ffi.new("int *")
        core = lib.us_core_new(entries, flags, cq_entries, file_slots, err)
        if core == ffi.NULL:
            raise OSError(-err[0], f"io_uring_setup(entries={entries}, flags={flags:#x}): "
                          f"{os.strerror(-err[0])}")
        self.ptr = core
        self.pid = os.getpid()
        self.flags = flags
        self.sq_entries = lib.us_core_sq_entries(core)
        self.cq_entries = lib.us_core_cq_entries(core)
        self.fd = lib.us_core_fd(core)
        self.stats = lib.us_core_stats(core)
        self.changes = lib.us_core_changes(core)
        self.closed = False
        self.kept = False
        self.acked = True

    def configure(self, chunk_size, copy_chunk_size, zc_budget, pipe_size, max_idle_pipes, keep_maps,
                  large_map):
        lib.us_core_configure(self.ptr, chunk_size, copy_chunk_size, zc_budget, pipe_size, max_idle_pipes,
                              keep_maps, large_map)

    def set_trace(self, on):
        _check(lib.us_core_set_trace(self.ptr, 1 if on else 0), "trace buffer")

    def trace(self):
        """[(t_ns, user_data, xfer_id, res, flags, len, opcode, role, offset)] of every CQE so far."""
        out = ffi.new("struct us_trace **")
        n = lib.us_core_trace(self.ptr, out)
        entries = out[0]
        return [(e.t_ns, e.user_data, e.xfer_id, e.res, e.flags, e.len, e.opcode, e.role, e.offset)
                for e in (entries[i] for i in range(n))]

    def register_eventfd(self, fd):
        _check(lib.us_core_register_eventfd(self.ptr, fd), f"io_uring_register_eventfd(fd {fd})")

    def set_iowq_max_workers(self, bounded, unbounded):
        _check(lib.us_core_iowq_max_workers(self.ptr, bounded, unbounded), "io_uring_register_iowq_max_workers")

    def pool(self, count, size):
        """Register the zero-copy buffer pool (once); raises OSError (ENOMEM under RLIMIT_MEMLOCK)."""
        return lib.us_core_pool(self.ptr, count, size)

    def pool_address(self, index):
        return lib.us_core_pool_address(self.ptr, index)

    def idle_pipe_bytes(self):
        """Bytes left in the engine's idle pipes (a test hook: it is always 0)."""
        return lib.us_core_idle_pipe_bytes(self.ptr)

    def changes_pending(self):
        """Changes the engine holds for the next run (found while starting another transfer)."""
        return lib.us_core_changes_pending(self.ptr)

    def busy(self):
        """Operations the kernel still owes a CQE for."""
        return lib.us_core_busy(self.ptr)

    def statistics(self):
        st = self.stats
        return {name: getattr(st, name) for name in STATS}

    def start_error(self):
        """(US_START_* reason, errno, file size for US_START_OFFSET) of the last refused start."""
        size = ffi.new("int64_t *")
        why = lib.us_core_start_error(self.ptr, size)
        return why, ffi.errno, size[0]

    def tee(self, file_fd, sock_fds, offset, count):
        """One transfer per socket (``struct us_xfer *`` each), or None with ``start_error()``."""
        n = len(sock_fds)
        out = ffi.new("struct us_xfer *[]", n)
        if lib.us_tee(self.ptr, file_fd, ffi.new("int[]", sock_fds), n, offset, count, 0, out) < 0:
            return None
        return [gc(out[i], xfer_put) for i in range(n)]

    def mappings_busy(self):
        return lib.us_core_mappings_busy(self.ptr)

    def cancel(self, x):
        lib.us_cancel(self.ptr, x)

    def cancel_all(self):
        lib.us_cancel_all(self.ptr)

    def run(self, wait_nr, timeout_ns):
        """Submit, reap, advance; returns the number of entries in ``self.changes``.
        Raises InterruptedError on a signal, so the caller's signal handlers run. The caller sets
        ``acked`` once it has handled every entry; until then each run hands them out again,
        first (a signal handler raising between the two loses nothing)."""
        ack = self.acked
        self.acked = False
        n = lib.us_run(self.ptr, wait_nr, timeout_ns, ack)
        if n <= 0:
            self.acked = True  # nothing to hand out: nothing to hand out again
            if n < 0:
                _check(n, "io_uring_enter")
        return n

    def raw_submit(self, fields):
        """Prepare and submit raw ops given as dicts of struct us_rawop fields, as whole chains;
        returns their user_data."""
        ops = ffi.new("struct us_rawop[]", len(fields))
        for i, f in enumerate(fields):
            for name, value in f.items():
                setattr(ops[i], name, value)
        _check(lib.us_raw_submit(self.ptr, ops, len(fields)), "prepare SQEs")
        return [ops[i].user_data for i in range(len(fields))]

    def close(self):
        """Tear the ring down; returns how many operations were still out (their memory is kept)."""
        if self.closed:
            return 0
        self.closed = True
        held = lib.us_core_close(self.ptr)
        self.kept = held > 0
        return held

    def __del__(self):
        ptr = getattr(self, "ptr", None)
        if ptr is None or os.getpid() != self.pid:
            return  # a forked child's copy: the parent owns the kernel side
        self.ptr = None
        lib.us_core_free(ptr)


class Pinned:
    """The address of a Python buffer (bytes, bytearray, mmap), held until ``unpin``.

    While pinned, an mmap refuses to close (BufferError) and a bytearray refuses to resize, so the
    memory cannot go away under the kernel.
    """

    __slots__ = ("obj", "address", "_cdata")

    def __init__(self, obj):
        self.obj = obj
        self._cdata = ffi.from_buffer(obj)
        self.address = int(ffi.cast("uintptr_t", self._cdata))

    def unpin(self):
        if self._cdata is not None:
            ffi.release(self._cdata)
            self._cdata = None


# ---- memory sources (uringsend.stream) ------------------------------------------------------
# us_send(core, mode, sock_fd, address, length, notify) and us_stream(core, mode, sock_fd,
# address, size, notify) -> struct us_xfer * or NULL (see Core.start_error); owned through
# gc(x, xfer_put) like xfer_start's. us_stream_commit(core, x, n) -> 0 sent at once, 1 behind the
# chain in flight, -errno ended; us_stream_end(core, x).
mem_send = lib.us_send
stream_open = lib.us_stream
stream_commit = lib.us_stream_commit
stream_end = lib.us_stream_end
START_NO_SLOT, START_REGISTER = lib.US_START_NO_SLOT, lib.US_START_REGISTER
MODE_SEND_ZC, MODE_SEND = lib.US_MODE_MMAP, lib.US_MODE_COPY  # SEND_ZC / SEND from memory
MODE_SEND_ZC_UNLESS_COPIED = lib.US_MODE_AUTO  # SEND_ZC until the kernel reports copying, then SEND
FALLBACK_COPIED = lib.US_FALLBACK_COPIED
