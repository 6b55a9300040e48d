"""Kernel facts about ring and request lifetime (docs/kernel-facts.md, facts 18-22), checked on the
real kernel, at the raw syscall level where liburing's helpers would hide the fact.

18   test_queue_exit_returns_at_once_and_the_kernel_keeps_the_pages
19   test_thread_exit_cancels_its_io_wq_splices
20   test_cq_overflow_stays_invisible_until_getevents
21   test_closed_socket_stays_open_while_a_request_holds_it,
     test_transfer_never_writes_to_a_reused_socket_fd_number
22  test_defer_taskrun_issues_the_next_link_member_on_getevents,
     test_ring_submit_runs_deferred_link_members
"""
import errno
import os
import select
import socket
import threading
import time

import uringsend
from uringsend import _lowlevel as ll
from helpers import Receiver, io_wq_workers, read_exactly, tcp_pair, unix_pair, wait_for
from _semantics import (BACKLOG, ERESTARTSYS, F_MORE, Recorder, RingView, SyscallRing, cancel, in_thread,
                        nothing_happens_for, stalled_pair, submit, wait_res)

LINK = ll.IOSQE_IO_LINK
GETEVENTS = SyscallRing.ENTER_GETEVENTS


# ---- fact 18: io_uring_queue_exit does not wait for NOTIFs ----------------------------------------
def _raw_changes(core, want, timeout_ns=5_000_000_000):
    """Run a bare engine (``ll.Core``) until ``want`` raw CQEs came: [(user_data, res, flags)]."""
    got = []
    while len(got) < want:
        n = core.run(1, timeout_ns)
        if not n:
            break
        got += [(ch.id, ch.res, ch.flags) for ch in (core.changes[i] for i in range(n)) if ch.what & ll.CH_RAW]
        core.acked = True  # handled: the next run must not hand these out again
    return got


def test_queue_exit_returns_at_once_and_the_kernel_keeps_the_pages():
    n = BACKLOG
    buf = bytearray(b"\x01" * n)
    pin = ll.Pinned(buf)
    client, peer = stalled_pair()  # the peer reads nothing yet: the pages stay queued
    core = ll.Core(8, 0)
    try:
        send = Recorder().op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=n,
                             op_flags=socket.MSG_NOSIGNAL)
        user_data, = core.raw_submit([send.fields(0)])
        (got_ud, sent, flags), = _raw_changes(core, 1)
        assert got_ud == user_data and sent > 0 and flags == F_MORE
        started = time.monotonic()
        assert core.close() == 1  # io_uring_queue_exit with its NOTIF not arrived: it never will be reaped
        assert time.monotonic() - started < 0.5
        buf[:] = b"\x02" * n
        got = read_exactly(peer, sent)
        early = got.count(b"\x01")
        assert got == b"\x01" * early + b"\x02" * (sent - early)
        assert sent - early > 0  # written after the ring was gone, and still sent
    finally:
        core.close()
        pin.unpin()
        client.close()
        peer.close()


# ---- fact 19: a thread's requests die with it ----------------------------------------------------------
def test_thread_exit_cancels_its_io_wq_splices():
    """The ring is made without SINGLE_ISSUER so that this thread can reap after the submitter exits.
    With one worker allowed, one splice is running (blocked on an empty pipe) and one is queued."""
    r, w = os.pipe()
    a, b = unix_pair()
    box = {}

    def submitter():
        core = box["core"] = ll.Core(8, 0)
        core.set_iowq_max_workers(1, 1)
        tid = threading.get_native_id()
        rec = Recorder()
        ops = [rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=100) for _ in range(2)]
        box["user_data"] = core.raw_submit([op.fields(0) for op in ops])
        wait_for(lambda: io_wq_workers(tid) == 1, what="an io-wq worker")
        box["early"] = _raw_changes(core, 1, 300_000_000)

    try:
        in_thread(submitter)
        core = box["core"]
        assert box["early"] == []  # both were pending while their thread lived
        got = _raw_changes(core, 2)
        first, second = box["user_data"]
        # only the queued one completes -ECANCELED; the running one leaks -ERESTARTSYS (fact 19).
        assert sorted(got) == [(first, -ERESTARTSYS, 0), (second, -errno.ECANCELED, 0)]
    finally:
        if "core" in box:
            box["core"].close()
        os.close(r)
        os.close(w)
        a.close()
        b.close()


# ---- fact 20: CQ overflow --------------------------------------------------------------------------------
def test_cq_overflow_stays_invisible_until_getevents():
    with SyscallRing(4, cq_entries=8) as ring:
        assert (ring.sq_entries, ring.cq_entries) == (4, 8)
        for batch in range(4):
            for i in range(4):
                ring.queue(ll.OP_NOP, 4 * batch + i)
            assert ring.enter(4) == 4  # 16 completions for 8 CQ slots: no -EBUSY
        assert ring.sq_flags & SyscallRing.SQ_CQ_OVERFLOW
        seen = ring.reap()
        assert [ud for ud, _, _ in seen] == list(range(8))
        assert ring.reap() == []  # room in the CQ now, yet the other 8 stay in the kernel
        assert ring.sq_flags & SyscallRing.SQ_CQ_OVERFLOW
        ring.enter(0, GETEVENTS)
        assert not ring.sq_flags & SyscallRing.SQ_CQ_OVERFLOW
        assert ring.reap() == [(ud, 0, 0) for ud in range(8, 16)]


# ---- fact 21: a closed socket lives on while a request holds it ----------------------------------------
def test_closed_socket_stays_open_while_a_request_holds_it():
    client, peer = tcp_pair()
    rec = Recorder()
    try:
        with uringsend.Ring(entries=8) as ring:
            poll = rec.op(ll.OP_POLL_ADD, client.fileno(), op_flags=select.POLLIN)
            submit(ring, [poll])
            nothing_happens_for(ring, lambda: poll.res is not None, 0.1)
            client.close()
            assert select.select([peer], [], [], 0.3)[0] == []  # no FIN: the ring holds the socket
            assert cancel(ring, rec, poll) == 0
            assert wait_res(ring, poll) == [-errno.ECANCELED]
        assert select.select([peer], [], [], 5)[0] == [peer]
        assert peer.recv(1) == b""  # the request ended: the socket closed for real
    finally:
        client.close()
        peer.close()


def test_transfer_never_writes_to_a_reused_socket_fd_number(make_file):
    """Rule 21 keeps the socket alive only for requests already submitted. A caller closing its
    socket mid-transfer must not have the next chains land on whatever takes that number."""
    path, _ = make_file(8 << 20)
    client, peer = stalled_pair(sndbuf=256 << 10)
    other, other_peer = socket.socketpair()
    reused = None
    try:
        with uringsend.Ring() as ring:
            t = ring.sendfile(client, path, mode="copy")
            nothing_happens_for(ring, lambda: t.done())
            fd = client.fileno()
            client.close()
            reused = os.dup2(other.fileno(), fd)  # an unrelated socket takes the number
            rx_other = Receiver(other_peer)
            rx = Receiver(peer)
            try:
                t.result(10)
            except OSError:
                pass
            ring.run_until_complete(10)
        os.close(reused)
        reused = None
        other.close()
        assert rx_other.join() == b""
        assert len(rx.join()) >= t.sent
    finally:
        if reused is not None:
            os.close(reused)
        for s in (client, peer, other, other_peer):
            s.close()


# ---- fact 22: with DEFER_TASKRUN the next link member runs only when the task enters with GETEVENTS -----
def test_defer_taskrun_issues_the_next_link_member_on_getevents():
    flags = ll.SETUP_FLAGS["SINGLE_ISSUER"] | ll.SETUP_FLAGS["DEFER_TASKRUN"]
    a, b = socket.socketpair()
    try:
        with SyscallRing(8, flags) as ring:
            ring.queue(ll.OP_NOP, 1, sqe_flags=LINK)
            ring.queue(ll.OP_NOP, 2, sqe_flags=LINK)
            ring.queue(ll.OP_NOP, 3)
            assert ring.enter(3) == 3
            assert ring.reap() == [(1, 0, 0)]
            assert ring.reap() == []  # no time makes the next one run; an enter does
            ring.enter(0, GETEVENTS)
            assert ring.reap() == [(2, 0, 0)]
            ring.enter(0, GETEVENTS)
            assert ring.reap() == [(3, 0, 0)]

            # A member whose turn came sits in task work: a cancel submitted without GETEVENTS
            # runs first and finds nothing; once the member is issued, a cancel finds it.
            ring.queue(ll.OP_NOP, 10, sqe_flags=LINK)
            ring.queue(ll.OP_POLL_ADD, 11, fd=a.fileno(), op_flags=select.POLLIN)
            ring.enter(2)
            assert ring.reap() == [(10, 0, 0)]
            ring.queue(ll.OP_ASYNC_CANCEL, 12, addr=11)
            ring.enter(1)
            assert ring.reap() == [(12, -errno.ENOENT, 0)]
            ring.enter(0, GETEVENTS)
            assert ring.reap() == []  # the poll is armed now
            ring.queue(ll.OP_ASYNC_CANCEL, 13, addr=11)
            ring.enter(1, GETEVENTS)
            assert sorted(ring.reap()) == [(11, -errno.ECANCELED, 0), (13, 0, 0)]
    finally:
        a.close()
        b.close()


def test_ring_submit_runs_deferred_link_members():
    rec = Recorder()
    with uringsend.Ring(entries=8) as ring:
        assert "DEFER_TASKRUN" in ring.setup_flags
        chain = [rec.op(ll.OP_NOP), rec.op(ll.OP_NOP)]
        with RingView(ring) as view:
            submit(ring, chain)
            # One submit-and-get-events ran the second member too: both CQEs are in the CQ
            # without a wait, before anything reaps or enters again.
            visible = view.cq_visible()
        assert sorted(ud for ud, _, _ in visible) == sorted(op.user_data for op in chain)
        assert wait_res(ring, *chain, timeout=0.5) == [0, 0] and len(ring.ledger) == 0
