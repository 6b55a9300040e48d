"""The only module that touches cffi's ``lib``/``ffi``: validate -> call -> check.

Everything above this module sees plain Python ints, tuples and exceptions.
"""
import mmap
import os
import struct

from ._uring import ffi, lib

IORING_CQE_F_MORE = lib.IORING_CQE_F_MORE
IORING_CQE_F_NOTIF = lib.IORING_CQE_F_NOTIF
IORING_SEND_ZC_REPORT_USAGE = lib.IORING_SEND_ZC_REPORT_USAGE
IORING_NOTIF_USAGE_ZC_COPIED = lib.IORING_NOTIF_USAGE_ZC_COPIED
IOSQE_IO_LINK = lib.IOSQE_IO_LINK
IOSQE_CQE_SKIP_SUCCESS = lib.IOSQE_CQE_SKIP_SUCCESS

OP_NOP = lib.IORING_OP_NOP
OP_READ_FIXED = lib.IORING_OP_READ_FIXED
OP_POLL_ADD = lib.IORING_OP_POLL_ADD
OP_ASYNC_CANCEL = lib.IORING_OP_ASYNC_CANCEL
OP_READ = lib.IORING_OP_READ
OP_SEND = lib.IORING_OP_SEND
OP_SPLICE = lib.IORING_OP_SPLICE
OP_TEE = lib.IORING_OP_TEE
OP_SEND_ZC = lib.IORING_OP_SEND_ZC
OP_SEND_ZC_FIXED = lib.US_OP_SEND_ZC_FIXED  # SEND_ZC with IORING_RECVSEND_FIXED_BUF

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
_OUR_NAMES = {OP_SEND_ZC_FIXED: "SEND_ZC_FIXED"}


def opcode_name(opcode):
    return _OUR_NAMES.get(opcode) or (OPCODE_NAMES[opcode] if opcode < len(OPCODE_NAMES) else str(opcode))


# struct us_op, packed from Python in one call per SQE; the layout is checked against the C one.
_OP = struct.Struct("=QQqqiiIIHHBB")
_OP_SIZE = ffi.sizeof("struct us_op")
assert _OP.size <= _OP_SIZE
_CQE = struct.Struct("=QiI")
assert _CQE.size == ffi.sizeof("struct us_cqe")


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
    ring = ffi.new("struct io_uring *")
    ret = lib.us_queue_init(entries, ring, flags, cq_entries)
    if ret == 0:
        lib.io_uring_queue_exit(ring)
    return ret


class RawRing:
    """One ``struct io_uring``: prepare packed SQE batches, submit, reap CQE batches."""

    def __init__(self, entries, flags, cq_entries=0, reap_batch=256):
        self._ring = ffi.new("struct io_uring *")
        ret = lib.us_queue_init(entries, self._ring, flags, cq_entries)
        if ret < 0:
            self._ring = None
            raise OSError(-ret, f"io_uring_setup(entries={entries}, flags={flags:#x}): {os.strerror(-ret)}")
        self.flags = flags
        self.sq_entries = lib.us_sq_entries(self._ring)
        self.cq_entries = lib.us_cq_entries(self._ring)
        self.fd = lib.us_ring_fd(self._ring)
        self._ops = ffi.new("struct us_op[]", self.sq_entries)
        self._ops_buf = ffi.buffer(self._ops)
        self._cqes = ffi.new("struct us_cqe[]", reap_batch)
        self._cqes_buf = ffi.buffer(self._cqes)
        self._reap_batch = reap_batch
        self._iovecs = None

    @property
    def closed(self):
        return self._ring is None

    def sq_space(self):
        return lib.io_uring_sq_space_left(self._ring)

    def prep(self, ops):
        """Prepare whole chains from ``ops`` (tuples in us_op field order) while they fit.

        Returns how many ops were prepared; always a chain boundary.
        """
        n = len(ops)
        if n > self.sq_entries:  # cut at the last chain boundary that fits, never inside a chain
            n = self.sq_entries
            while n and ops[n - 1][11] & IOSQE_IO_LINK:
                n -= 1
        buf = self._ops_buf
        pack = _OP.pack_into
        for i in range(n):
            pack(buf, i * _OP_SIZE, *ops[i])
        return _check(lib.us_prep(self._ring, self._ops, n), "prepare SQEs")

    def submit(self):
        # GETEVENTS too: with DEFER_TASKRUN, the next member of a link is issued from task work
        # that runs only when we enter with GETEVENTS; a plain submit would leave it parked.
        return _check(lib.io_uring_submit_and_get_events(self._ring), "io_uring_enter(submit)")

    def reap(self, wait_nr=0, timeout_ns=-1):
        """Up to one batch of CQEs as (user_data, res, flags); [] on timeout.

        Raises InterruptedError on a signal, so the caller's signal handlers run.
        """
        n = lib.us_reap(self._ring, self._cqes, self._reap_batch, wait_nr, timeout_ns)
        if n < 0:
            _check(n, "io_uring_enter(GETEVENTS)")
        if n == 0:
            return []
        return list(_CQE.iter_unpack(self._cqes_buf[: n * _CQE.size]))

    def register_buffers(self, regions):
        """Register [(address, length)] as fixed buffers 0..n-1."""
        iov = ffi.new("struct iovec[]", len(regions))
        for i, (addr, length) in enumerate(regions):
            iov[i].iov_base = ffi.cast("void *", addr)
            iov[i].iov_len = length
        _check(lib.io_uring_register_buffers(self._ring, iov, len(regions)), "io_uring_register_buffers")
        self._iovecs = iov

    def register_eventfd(self, fd):
        _check(lib.io_uring_register_eventfd(self._ring, fd), f"io_uring_register_eventfd(fd {fd})")

    def set_iowq_max_workers(self, bounded, unbounded):
        values = ffi.new("unsigned int[2]", [bounded, unbounded])
        _check(lib.io_uring_register_iowq_max_workers(self._ring, values), "io_uring_register_iowq_max_workers")
        return values[0], values[1]

    def close(self):
        if self._ring is not None:
            lib.io_uring_queue_exit(self._ring)
            self._ring = None


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


class FileMapping:
    """A read-only shared mapping of ``length`` bytes of ``fd`` from ``offset`` (page aligned).

    Holds no file descriptor. ``unmap()`` only when the kernel references none of its pages.
    """

    __slots__ = ("address", "length")

    def __init__(self, fd, length, offset):
        err = ffi.new("int *")
        self.address = lib.us_map_file(fd, length, offset, err)
        self.length = length
        if err[0]:
            raise OSError(-err[0], f"mmap of fd {fd} ({length} bytes at {offset}): {os.strerror(-err[0])}")

    def drop(self, offset, length):
        """Unmap the whole pages inside [offset, offset+length) from the page tables (not the file)."""
        start = -(-offset // PAGE) * PAGE
        stop = (offset + length) // PAGE * PAGE
        if stop > start and self.address:
            _check(lib.us_drop_pages(self.address + start, stop - start), "madvise(MADV_DONTNEED)")

    def unmap(self):
        if self.address:
            _check(lib.us_unmap(self.address, self.length), "munmap")
            self.address = 0
