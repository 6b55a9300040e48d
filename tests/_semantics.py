"""Helpers for the kernel-fact tests (tests/test_semantics_*.py): raw ops on a Ring, bounded
waits, sockets that cannot take a byte, io-wq worker counts, a bare syscall ring, and read-only
views of a Ring's own SQ, CQ and SQE array.

Which test shows which fact: docs/kernel-facts.md, under each fact.
"""
import array
import ctypes
import fcntl
import mmap
import os
import select
import struct
import termios
import threading

import pytest

from helpers import tcp_pair
from uringsend import _lowlevel as ll
from uringsend.ledger import Op

PAGE = mmap.PAGESIZE
F_MORE = ll.IORING_CQE_F_MORE
F_NOTIF = ll.IORING_CQE_F_NOTIF
ERESTARTSYS = 512  # kernel-internal errno that a cancelled splice leaks into its CQE
SPLICE_F_NONBLOCK = 2


class Recorder:
    """Owner of raw ops: the ledger sets ``op.res``; releases (NOTIFs) are recorded in order."""

    def __init__(self):
        self.released = []

    def _on_result(self, op, res, now):
        pass

    def _on_release(self, op, copied, now):
        self.released.append((op, copied))

    def op(self, opcode, fd=-1, **kw):
        return Op(self, opcode, fd, **kw)


def submit(ring, *chains):
    """Each chain is linked with IOSQE_IO_LINK (all but its last op); all chains go in one
    submission."""
    ops, flags = [], []
    for chain in chains:
        chain = list(chain)
        ops += chain
        flags += [ll.IOSQE_IO_LINK] * (len(chain) - 1) + [0]
    ring.ledger.submit(ops, sqe_flags=flags)


def submit_flagged(ring, pairs):
    """Prepare ``[(op, sqe_flags)]`` exactly as given (e.g. IOSQE_IO_HARDLINK), in one submission."""
    ring.ledger.submit([op for op, _ in pairs], sqe_flags=[flags for _, flags in pairs])


def wait_res(ring, *ops, timeout=10):
    ring.driver.run_until(lambda: all(op.res is not None for op in ops), timeout)
    return [op.res for op in ops]


def wait_released(ring, rec, *ops, timeout=10):
    ring.driver.run_until(lambda: all(any(o is op for o, _ in rec.released) for op in ops), timeout)


def nothing_happens_for(ring, until, seconds=0.3):
    """A negative check, for what has no event to wait on: reap for ``seconds`` and assert that
    ``until()`` stayed false (an op that must stay blocked, a release that must not come yet)."""
    with pytest.raises(TimeoutError):
        ring.driver.run_until(until, seconds)


def cancel(ring, rec, target):
    """ASYNC_CANCEL ``target``; returns the cancel's own result."""
    c = rec.op(ll.OP_ASYNC_CANCEL, addr=target.user_data)
    submit(ring, [c])
    return wait_res(ring, c)[0]


def no_orphans(ring):
    """No CQE reached the engine or the ledger without an op to take it."""
    assert ring.statistics().orphan_cqes == 0
    if ring.ledger.trace is not None:
        assert all(op is not None for _, op, *_ in ring.ledger.trace)
    return True


def cqes(ring, op):
    """(res, flags) of every CQE the trace holds for ``op``'s user_data, in arrival order."""
    return [(res, flags) for _, _, ud, res, flags in ring.ledger.trace if ud == op.user_data]


IOSQE_FIXED_FILE = 1 << 0


class RingView:
    """Read-only looks into a Ring's own rings (mapped again from its fd), for what the engine
    keeps to itself: the kernel's SQ flags word, the CQEs not yet reaped, the SQEs prepared."""

    _OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
    SQ_CQ_OVERFLOW = 1 << 1

    def __init__(self, ring):
        with SyscallRing(ring.sq_entries) as probe:  # the rings' layout, from a ring of that size
            self._tail_at, self._flags_at, ring_len = probe._sq_tail, probe._sq_flags, len(probe.sq)
            self._cq_head_at, self._cq_tail_at, self._cqes_at = probe._cq_head, probe._cq_tail, probe._cqes
        self.entries = ring.sq_entries
        self._cq_mask = ring.cq_entries - 1
        self._sq = mmap.mmap(ring.fd, ring_len, offset=self._OFF_SQ_RING)
        self._cq = mmap.mmap(ring.fd, self._cqes_at + 16 * ring.cq_entries, offset=self._OFF_CQ_RING)
        self._sqes = mmap.mmap(ring.fd, 64 * self.entries, offset=self._OFF_SQES)

    def cq_visible(self):
        """The CQEs in the CQ now, not yet reaped, as (user_data, res, flags); consumes nothing."""
        head = struct.unpack_from("I", self._cq, self._cq_head_at)[0]
        tail = struct.unpack_from("I", self._cq, self._cq_tail_at)[0]
        out = []
        while head != tail:
            out.append(struct.unpack_from("QiI", self._cq, self._cqes_at + 16 * (head & self._cq_mask)))
            head = (head + 1) & 0xFFFFFFFF
        return out

    @property
    def sq_flags(self):
        return struct.unpack_from("I", self._sq, self._flags_at)[0]

    @property
    def cq_overflow(self):
        """The kernel holds CQEs that did not fit the CQ (IORING_SQ_CQ_OVERFLOW)."""
        return bool(self.sq_flags & self.SQ_CQ_OVERFLOW)

    def sqes(self):
        """Every SQE prepared so far, in preparation order, as dicts of struct io_uring_sqe fields:
        the kernel copies an SQE when it is submitted and leaves the array as it was. Asserts that
        no more SQEs than the SQ holds were prepared in the ring's life, so none was overwritten."""
        tail = struct.unpack_from("I", self._sq, self._tail_at)[0]
        assert tail <= self.entries, f"{tail} SQEs prepared on a ring of {self.entries}: the first ones were overwritten"
        out = []
        for i in range(tail):
            (opcode, flags, ioprio, fd, off, addr, length, op_flags, user_data,
             buf_index) = struct.unpack_from("BBHiQQIIQH", self._sqes, 64 * i)
            out.append({"opcode": opcode, "flags": flags, "ioprio": ioprio, "fd": fd, "off": off,
                        "addr": addr, "len": length, "op_flags": op_flags, "user_data": user_data,
                        "buf_index": buf_index})
        return out

    def close(self):
        self._sq.close()
        self._cq.close()
        self._sqes.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prepared_sqes(ring):
    """Every SQE prepared on ``ring`` so far (by its engine or as raw ops): ``RingView.sqes``."""
    with RingView(ring) as view:
        return view.sqes()


def stalled_pair(sndbuf=None):
    """A TCP pair whose peer reads nothing yet. Its receive buffer is not tiny: a window smaller
    than the loopback MSS can leave the sender on its persist timer for many seconds once the peer
    reads. ``sndbuf`` fixes the sender's buffer (no autotuning), so that once full it stays full;
    left to autotune, it grows past what the peer holds, so a SEND_ZC of BACKLOG bytes completes
    with most of its pages still queued at the sender."""
    return tcp_pair(rcvbuf=256 << 10, sndbuf=sndbuf)


BACKLOG = 2 << 20


def pipe_pending(fd):
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


def fill(sock):
    """Send until the socket takes no more and stays so (on TCP, until the peer's window closed
    too: until then ACKs keep making room). Returns the bytes it took."""
    chunk = b"f" * 65536
    n = 0
    sock.setblocking(False)
    try:
        while True:
            try:
                while True:
                    n += sock.send(chunk)
            except BlockingIOError:
                pass
            if not select.select([], [sock], [], 0.1)[1]:
                try:
                    n += sock.send(chunk)
                except BlockingIOError:
                    return n
    finally:
        sock.setblocking(True)


def in_thread(func, *args):
    """Run ``func`` in a new thread (a new task: its own io-wq) and re-raise what it raised."""
    box = {}

    def run():
        try:
            box["result"] = func(*args)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "helper thread did not finish"
    if "error" in box:
        raise box["error"]
    return box.get("result")


class SyscallRing:
    """A bare io_uring driven by the raw syscalls, for facts liburing's helpers hide: a submit
    without GETEVENTS, the SQ flags word, CQEs left in the kernel's overflow list."""

    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
    NR_SETUP, NR_ENTER = 425, 426  # the same on every architecture that has io_uring
    SETUP_CQSIZE = 1 << 3
    ENTER_GETEVENTS = 1
    SQ_CQ_OVERFLOW = 1 << 1

    def __init__(self, entries, flags=0, cq_entries=0):
        params = bytearray(120)  # struct io_uring_params
        struct.pack_into("III", params, 0, entries, cq_entries,
                         flags | (self.SETUP_CQSIZE if cq_entries else 0))
        fd = self._libc.syscall(self.NR_SETUP, entries, (ctypes.c_char * 120).from_buffer(params))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        self.sq_entries, self.cq_entries = struct.unpack_from("II", params, 0)
        sq_head, self._sq_tail, sq_mask, _, self._sq_flags, _, sq_array = struct.unpack_from("7I", params, 40)
        self._cq_head, self._cq_tail, cq_mask, _, _, self._cqes, _ = struct.unpack_from("7I", params, 80)
        self.sq = mmap.mmap(fd, sq_array + 4 * self.sq_entries, offset=0)
        self.cq = mmap.mmap(fd, self._cqes + 16 * self.cq_entries, offset=0x8000000)
        self.sqes = mmap.mmap(fd, 64 * self.sq_entries, offset=0x10000000)
        self._sq_mask = self._u32(self.sq, sq_mask)
        self._cq_mask = self._u32(self.cq, cq_mask)
        for i in range(self.sq_entries):
            struct.pack_into("I", self.sq, sq_array + 4 * i, i)

    @staticmethod
    def _u32(m, off):
        return struct.unpack_from("I", m, off)[0]

    def queue(self, opcode, user_data, fd=-1, addr=0, length=0, op_flags=0, sqe_flags=0):
        tail = self._u32(self.sq, self._sq_tail)
        at = 64 * (tail & self._sq_mask)
        self.sqes[at:at + 64] = struct.pack("BBHiQQIIQ24x", opcode, sqe_flags, 0, fd, 0, addr, length,
                                            op_flags, user_data)
        struct.pack_into("I", self.sq, self._sq_tail, (tail + 1) & 0xFFFFFFFF)

    def enter(self, to_submit, flags=0):
        ret = self._libc.syscall(self.NR_ENTER, self.fd, to_submit, 0, flags, None, 0)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        return ret

    @property
    def sq_flags(self):
        return self._u32(self.sq, self._sq_flags)

    def reap(self):
        """Every CQE visible in the CQ ring now, as (user_data, res, flags); no syscall."""
        head = self._u32(self.cq, self._cq_head)
        tail = self._u32(self.cq, self._cq_tail)
        out = []
        while head != tail:
            out.append(struct.unpack_from("QiI", self.cq, self._cqes + 16 * (head & self._cq_mask)))
            head = (head + 1) & 0xFFFFFFFF
        struct.pack_into("I", self.cq, self._cq_head, head)
        return out

    def close(self):
        for m in (self.sq, self.cq, self.sqes):
            m.close()
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
