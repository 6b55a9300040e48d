"""Kernel facts about headers and linked chains (docs/kernel-facts.md, facts 0-4 and 24),
checked at the raw op level on the real kernel, then in the engines that rely on them.

headers  test_constants_newer_than_liburing_2_3, test_extension_links_liburing_statically
1        test_short_file_to_pipe_splice_breaks_the_link_and_strands_bytes,
         test_splice_at_eof_and_short_tee_break_the_link
2   test_short_send_without_waitall_keeps_the_link,
         test_send_with_waitall_breaks_the_link_only_when_cut_short,
         test_engines_send_with_waitall_and_never_hardlink
3        test_hardlink_runs_a_splice_after_eof_and_it_blocks
4        test_chain_ends_at_a_submission_boundary, test_prep_failure_inside_a_chain_cancels_every_member,
         test_raw_prep_takes_whole_chains_only,
         test_raw_prep_longer_than_the_sq_still_stops_at_a_chain_boundary
24       test_cancel_of_a_link_member_not_yet_issued_is_enoent
"""
import errno
import os
import select
import socket

import pytest

import uringsend
from uringsend import _lowlevel as ll
from uringsend._uring import lib
from helpers import Receiver, tcp_pair, unix_pair
from _semantics import (ERESTARTSYS, IOSQE_FIXED_FILE, Recorder, cancel, cqes, pipe_pending, prepared_sqes,
                        nothing_happens_for, submit, stalled_pair, submit_flagged, wait_res)

LINK = ll.IOSQE_IO_LINK
HARDLINK = lib.IOSQE_IO_HARDLINK
SEND_OPS = (ll.OP_SEND, ll.OP_SEND_ZC, ll.OP_SEND_ZC_FIXED)


# ---- headers ----------------------------------------------------------------------------------
def test_constants_newer_than_liburing_2_3():
    assert ll.IORING_SEND_ZC_REPORT_USAGE == 1 << 3
    assert ll.IORING_NOTIF_USAGE_ZC_COPIED == 1 << 31
    assert ll.OPCODE_NAMES.index("PIPE") == 62
    assert ll.OPCODE_NAMES.index("SEND_ZC") == ll.OP_SEND_ZC == 47


def test_extension_links_liburing_statically():
    from uringsend import _uring
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert os.path.realpath(_uring.__file__) in maps
    assert "liburing" not in maps  # no liburing.so mapped: prep/reap helpers live in the extension


# ---- fact 1: SPLICE/TEE fail the link when res != len -----------------------------------------
def test_short_file_to_pipe_splice_breaks_the_link_and_strands_bytes(make_file):
    path, data = make_file(200_000)
    rec = Recorder()
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            chain = [rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=0, off=-1, len=200_000),
                     rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=200_000),
                     rec.op(ll.OP_NOP)]
            submit(ring, chain)
            assert wait_res(ring, *chain) == [65536, -errno.ECANCELED, -errno.ECANCELED]
        assert pipe_pending(r) == 65536  # stranded: the cancelled pipe->socket splice never ran
        assert os.read(r, 65536) == data[:65536]
    finally:
        for x in (fd, r, w):
            os.close(x)
        a.close()
        b.close()


def test_splice_at_eof_and_short_tee_break_the_link(make_file):
    path, data = make_file(4096)
    rec = Recorder()
    fd = os.open(path, os.O_RDONLY)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.write(w1, data[:100])
    try:
        with uringsend.Ring(entries=8) as ring:
            eof = [rec.op(ll.OP_SPLICE, w2, fd_in=fd, off_in=4096, off=-1, len=100), rec.op(ll.OP_NOP)]
            tee = [rec.op(ll.OP_TEE, w2, fd_in=r1, len=200), rec.op(ll.OP_NOP)]
            submit(ring, eof, tee)
            assert wait_res(ring, *eof) == [0, -errno.ECANCELED]
            assert wait_res(ring, *tee) == [100, -errno.ECANCELED]
        assert os.read(r2, 200) == data[:100]
        assert os.read(r1, 200) == data[:100]  # tee does not consume its source
    finally:
        for x in (fd, r1, w1, r2, w2):
            os.close(x)


# ---- fact 2: a short send breaks the link only with MSG_WAITALL --------------------------
def test_short_send_without_waitall_keeps_the_link():
    payload = os.urandom(4 << 20)
    pin = ll.Pinned(payload)
    rec = Recorder()
    client, peer = stalled_pair(sndbuf=256 << 10)
    try:
        with uringsend.Ring(entries=8) as ring:
            send = rec.op(ll.OP_SEND, client.fileno(), addr=pin.address, len=len(payload),
                          op_flags=socket.MSG_NOSIGNAL)
            nop = rec.op(ll.OP_NOP)
            submit(ring, [send, nop])
            sent, after = wait_res(ring, send, nop)
        assert 0 < sent < len(payload) and after == 0
        client.shutdown(socket.SHUT_WR)
        assert Receiver(peer).join() == payload[:sent]
    finally:
        pin.unpin()
        client.close()
        peer.close()


def test_send_with_waitall_breaks_the_link_only_when_cut_short():
    """With MSG_WAITALL the kernel keeps sending (poll-retried) until all of it went; cut short by
    a cancel after progress, it completes with the bytes sent (not -ECANCELED) and breaks the link."""
    payload = os.urandom(4 << 20)
    pin = ll.Pinned(payload)
    rec = Recorder()
    client, peer = stalled_pair(sndbuf=256 << 10)
    try:
        with uringsend.Ring(entries=8) as ring:
            whole = rec.op(ll.OP_SEND, client.fileno(), addr=pin.address, len=4096,
                           op_flags=socket.MSG_WAITALL | socket.MSG_NOSIGNAL)
            nop1 = rec.op(ll.OP_NOP)
            submit(ring, [whole, nop1])
            assert wait_res(ring, whole, nop1) == [4096, 0]
            send = rec.op(ll.OP_SEND, client.fileno(), addr=pin.address + 4096, len=len(payload) - 4096,
                          op_flags=socket.MSG_WAITALL | socket.MSG_NOSIGNAL)
            nop2 = rec.op(ll.OP_NOP)
            submit(ring, [send, nop2])
            nothing_happens_for(ring, lambda: send.res is not None)
            assert cancel(ring, rec, send) == 0
            sent, after = wait_res(ring, send, nop2)
        assert 0 < sent < len(payload) - 4096
        assert after == -errno.ECANCELED
        client.shutdown(socket.SHUT_WR)
        assert Receiver(peer).join() == payload[:4096 + sent]
    finally:
        pin.unpin()
        client.close()
        peer.close()


def test_engines_send_with_waitall_and_never_hardlink(make_file):
    """Every SQE the engine prepares, read back from the ring's SQE array: links are plain
    IOSQE_IO_LINK (IOSQE_FIXED_FILE aside, for the registered socket and file), never
    IOSQE_IO_HARDLINK, and every send asks for MSG_WAITALL."""
    path, data = make_file(300_000)
    for mode in ("splice", "zerocopy", "mmap", "copy"):
        client, peer = tcp_pair()
        rx = Receiver(peer)
        with uringsend.Ring(trace=True) as ring:
            t = ring.sendfile(client, path, mode=mode, header=b"HEAD")
            assert t.result(10) == len(data)
            ring.run_until_complete(10)
            prepared = prepared_sqes(ring)
            completed = {e.user_data for e in ring.trace()}
        client.close()
        assert rx.join() == b"HEAD" + data
        peer.close()
        assert completed and completed <= {f["user_data"] for f in prepared}, mode  # read back right
        assert {f["flags"] & ~IOSQE_FIXED_FILE for f in prepared} <= {0, LINK}, mode
        sends = [f for f in prepared if f["opcode"] in SEND_OPS]
        assert sends, mode
        assert all(f["op_flags"] & socket.MSG_WAITALL for f in sends), mode


# ---- fact 3: IOSQE_IO_HARDLINK ignores results --------------------------------------------------
def test_hardlink_runs_a_splice_after_eof_and_it_blocks(make_file):
    path, _ = make_file(4096)
    rec = Recorder()
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            fill_op = rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=4096, off=-1, len=4096)
            send = rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=4096)
            submit_flagged(ring, [(fill_op, HARDLINK), (send, 0)])
            assert wait_res(ring, fill_op) == [0]
            # With LINK the send would be -ECANCELED now; hardlinked it runs on an empty pipe.
            nothing_happens_for(ring, lambda: send.res is not None)
            assert cancel(ring, rec, send) == -errno.EALREADY
            assert wait_res(ring, send) == [-ERESTARTSYS]
        assert pipe_pending(r) == 0
        assert not select.select([b], [], [], 0)[0]
    finally:
        for x in (fd, r, w):
            os.close(x)
        a.close()
        b.close()


# ---- fact 4: a chain ends at a submission boundary; a prep failure cancels the whole chain ------
def test_chain_ends_at_a_submission_boundary():
    rec = Recorder()
    r, w = os.pipe()
    try:
        with uringsend.Ring(entries=8) as ring:
            bad = os.dup(r)
            os.close(bad)  # closed after the ring exists, so the ring cannot have reused it
            head = rec.op(ll.OP_SPLICE, w, fd_in=bad, off_in=-1, off=-1, len=1)
            tail = rec.op(ll.OP_NOP)
            submit_flagged(ring, [(head, LINK)])
            submit_flagged(ring, [(tail, 0)])  # LINK was set on head, but a new submission began
            assert wait_res(ring, head, tail) == [-errno.EBADF, 0]
            head = rec.op(ll.OP_SPLICE, w, fd_in=bad, off_in=-1, off=-1, len=1)
            tail = rec.op(ll.OP_NOP)
            submit_flagged(ring, [(head, LINK), (tail, 0)])
            assert wait_res(ring, head, tail) == [-errno.EBADF, -errno.ECANCELED]
    finally:
        os.close(r)
        os.close(w)


def test_prep_failure_inside_a_chain_cancels_every_member():
    rec = Recorder()
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            chain = [rec.op(ll.OP_NOP),
                     rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=1, op_flags=1 << 30),
                     rec.op(ll.OP_NOP)]
            submit(ring, chain)
            # The head had not run yet: it is cancelled too, although it would have succeeded.
            assert wait_res(ring, *chain) == [-errno.ECANCELED, -errno.EINVAL, -errno.ECANCELED]
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def _closed_fd():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


def _singles_then_a_chain(ring, rec, w, singles):
    """Submit ``singles`` NOPs then a 3-op chain in one call, once with a head that succeeds and
    once with one that fails (a splice from a closed fd): two submissions each time, the singles
    then the chain whole; a failing head cancels the rest."""
    bad = _closed_fd()
    for failing_head in (False, True):
        ops = [rec.op(ll.OP_NOP) for _ in range(singles)]
        head = (rec.op(ll.OP_SPLICE, w, fd_in=bad, off_in=-1, off=-1, len=1) if failing_head
                else rec.op(ll.OP_NOP))
        chain = [head, rec.op(ll.OP_NOP), rec.op(ll.OP_NOP)]
        enters = ring.statistics().enters
        ring.ledger.submit(ops + chain, sqe_flags=[0] * singles + [LINK, LINK, 0])
        assert ring.statistics().enters - enters == 2  # the singles, then the chain
        want = [-errno.EBADF, -errno.ECANCELED, -errno.ECANCELED] if failing_head else [0] * 3
        assert wait_res(ring, *ops, *chain) == [0] * singles + want


def test_raw_prep_takes_whole_chains_only():
    """Raw ops are prepared whole chains at a time: 6 single ops leave 2 of 8 slots, so a 3-op
    chain is not split; what was prepared is submitted first, and the chain whole in a second
    submission. Whole, its head's failure cancels the rest (split at a submission boundary, the
    members past it would run: [KF 4])."""
    rec = Recorder()
    r, w = os.pipe()
    try:
        with uringsend.Ring(entries=8) as ring:
            _singles_then_a_chain(ring, rec, w, 6)
    finally:
        os.close(r)
        os.close(w)


def test_raw_prep_longer_than_the_sq_still_stops_at_a_chain_boundary():
    """5 ops on a 4-entry SQ: the 2 singles go in a first submission, the 3-op chain whole in a
    second. A single chain longer than the SQ is refused (EINVAL) with nothing of it prepared."""
    rec = Recorder()
    r, w = os.pipe()
    try:
        with uringsend.Ring(entries=4) as ring:
            _singles_then_a_chain(ring, rec, w, 2)
            too_long = [rec.op(ll.OP_NOP) for _ in range(5)]
            with pytest.raises(ValueError):
                ring.ledger.submit(too_long)
            with pytest.raises(OSError) as exc:
                ring._core.raw_submit([op.fields(LINK) for op in too_long[:-1]] + [too_long[-1].fields(0)])
            assert exc.value.errno == errno.EINVAL
            assert ring._core.busy() == 0 and len(ring.ledger) == 0  # nothing of it was prepared
            assert ring.poll(0.05) == 0
    finally:
        os.close(r)
        os.close(w)


# ---- fact 24: ASYNC_CANCEL finds only issued requests --------------------------------------------------
def test_cancel_of_a_link_member_not_yet_issued_is_enoent():
    rec = Recorder()
    a, b = unix_pair()
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            poll = rec.op(ll.OP_POLL_ADD, a.fileno(), op_flags=select.POLLIN)
            nop = rec.op(ll.OP_NOP)
            submit(ring, [poll, nop])
            nothing_happens_for(ring, lambda: poll.res is not None)
            assert cancel(ring, rec, nop) == -errno.ENOENT  # linked behind the poll: not issued
            assert nop.res is None
            assert cancel(ring, rec, poll) == 0
            assert wait_res(ring, poll, nop) == [-errno.ECANCELED, -errno.ECANCELED]
            assert cqes(ring, nop) == [(-errno.ECANCELED, 0)]
    finally:
        a.close()
        b.close()
