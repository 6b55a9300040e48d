"""Kernel facts about SEND_ZC (docs/kernel-facts.md, facts 11-17), checked at the raw op level on the
real kernel through the ledger that relies on them (it routes each NOTIF to its op's owner).

11  test_send_zc_result_f_more_then_notif_same_user_data,
         test_send_zc_error_still_gets_f_more_and_a_notif[*], test_send_zc_on_unix_falls_back_to_copying_sends
12       test_link_cancelled_send_zc_has_no_f_more_yet_a_notif
13       test_notifs_arrive_out_of_submission_order
14       test_notif_waits_for_the_peer_shutdown_does_not_release,
         test_peer_close_with_unread_data_resets_and_releases,
         test_buffer_changed_before_the_notif_changes_what_the_peer_gets
15       test_report_usage_notif_res_is_a_flag_word
16       test_send_zc_fixed_bad_index_or_range_is_efault (RLIMIT_MEMLOCK: tests/test_reliability_*.py)
17       test_cqe_skip_success_on_send_zc_is_einval_without_notif
"""
import ctypes
import errno
import os
import socket

import pytest

import uringsend
from uringsend import _lowlevel as ll
from helpers import Receiver, read_exactly, reset, tcp_pair, unix_pair
from _semantics import (BACKLOG, F_MORE, F_NOTIF, PAGE, Recorder, cancel, cqes, fill, no_orphans,
                        nothing_happens_for, stalled_pair, submit, submit_flagged, wait_released, wait_res)

REPORT_USAGE = ll.IORING_SEND_ZC_REPORT_USAGE
ZC_COPIED_S32 = -(1 << 31)  # IORING_NOTIF_USAGE_ZC_COPIED as the CQE's signed res
FLAGS = socket.MSG_NOSIGNAL


def released_ops(rec):
    return [op for op, _ in rec.released]


# ---- fact 11: F_MORE, then a NOTIF with the same user_data, also after errors ------------------------
def test_send_zc_result_f_more_then_notif_same_user_data(tcp):
    client, peer = tcp
    payload = os.urandom(65536)
    pin = ll.Pinned(payload)
    rec = Recorder()
    rx = Receiver(peer)
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            send = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=len(payload),
                          op_flags=FLAGS | socket.MSG_WAITALL)
            submit(ring, [send])
            wait_released(ring, rec, send)
            assert cqes(ring, send) == [(65536, F_MORE), (0, F_NOTIF)]
            assert rec.released == [(send, None)]  # no REPORT_USAGE: nothing said about copying
            assert len(ring.ledger) == 0 and no_orphans(ring)
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == payload
    finally:
        pin.unpin()


ERRORS = ["EFAULT", "EINVAL", "EBADF", "ENOTSOCK", "EOPNOTSUPP", "ECONNRESET", "EPIPE", "ECANCELED"]


@pytest.mark.parametrize("case", ERRORS)
def test_send_zc_error_still_gets_f_more_and_a_notif(case):
    payload = os.urandom(1000)
    pin = ll.Pinned(payload)
    rec = Recorder()
    client, peer = unix_pair() if case == "EOPNOTSUPP" else stalled_pair(sndbuf=256 << 10)
    r, w = os.pipe()
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            fd, addr, zc_flags = client.fileno(), pin.address, 0
            if case == "EFAULT":
                addr = PAGE  # below mmap_min_addr: never mapped
            elif case == "EINVAL":
                zc_flags = 1 << 14  # no such SEND_ZC flag
            elif case == "EBADF":
                fd = os.dup(w)
                os.close(fd)  # closed after the ring exists, so the ring cannot have reused it
            elif case == "ENOTSOCK":
                fd = w
            elif case == "ECONNRESET":
                reset(peer)
            elif case == "EPIPE":
                client.shutdown(socket.SHUT_WR)
            elif case == "ECANCELED":
                fill(client)
            send = rec.op(ll.OP_SEND_ZC, fd, addr=addr, len=len(payload), op_flags=FLAGS | socket.MSG_WAITALL,
                          zc_flags=zc_flags)
            submit(ring, [send])
            if case == "ECANCELED":
                nothing_happens_for(ring, lambda: send.res is not None)  # no room and no progress
                assert cancel(ring, rec, send) == 0
            wait_released(ring, rec, send)
            assert cqes(ring, send) == [(-getattr(errno, case), F_MORE), (0, F_NOTIF)]
            assert released_ops(rec) == [send]
            assert len(ring.ledger) == 0 and no_orphans(ring)
    finally:
        pin.unpin()
        os.close(r)
        os.close(w)
        client.close()
        peer.close()


@pytest.mark.parametrize("mode", ["zerocopy", "mmap"])
def test_send_zc_on_unix_falls_back_to_copying_sends(mode, make_file):
    path, data = make_file(600_000)
    a, b = unix_pair()
    rx = Receiver(b)
    try:
        with uringsend.Ring(trace=True) as ring:
            t = ring.sendfile(a, path, mode=mode)
            assert t.released(10) == len(data)
            ring.run_until_complete(10)
            results = [(e.op, e.res) for e in ring.trace()
                       if e.transfer is t and e.role == "send" and not e.notif]
        zc = "SEND_ZC"  # from a registered buffer in mode 'zerocopy' (SEND_ZC_FIXED): named SEND_ZC
        assert results[0] == (zc, -errno.EOPNOTSUPP)
        first_copy = next(i for i, (name, _) in enumerate(results) if name == "SEND")
        assert results[1:first_copy] == [(zc, -errno.ECANCELED)] * (first_copy - 1)  # the rest of its chain
        copies = results[first_copy:]
        assert {name for name, _ in copies} == {"SEND"} and sum(res for _, res in copies) == len(data)
        assert "EOPNOTSUPP" in t.fallback
        released = [e for e in t.events if e.kind == "released"]
        assert sum(e.nbytes for e in released) == len(data) and all(e.copied for e in released)
        a.close()
        assert rx.join() == data
    finally:
        a.close()
        b.close()


# ---- fact 12: a link-cancelled SEND_ZC: -ECANCELED without F_MORE, and still a NOTIF -------------------
def test_link_cancelled_send_zc_has_no_f_more_yet_a_notif(tcp):
    client, _ = tcp
    payload = os.urandom(1000)
    pin = ll.Pinned(payload)
    rec = Recorder()
    r, w = os.pipe()
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            bad = os.dup(r)
            os.close(bad)
            sends = []
            for _ in range(3):
                head = rec.op(ll.OP_SPLICE, w, fd_in=bad, off_in=-1, off=-1, len=1)
                send = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=len(payload),
                              op_flags=FLAGS | socket.MSG_WAITALL)
                submit(ring, [head, send])
                assert wait_res(ring, head) == [-errno.EBADF]
                sends.append(send)
            wait_released(ring, rec, *sends)
            for send in sends:
                assert cqes(ring, send) == [(-errno.ECANCELED, 0), (0, F_NOTIF)]
            assert no_orphans(ring) and len(ring.ledger) == 0
    finally:
        pin.unpin()
        os.close(r)
        os.close(w)


# ---- fact 13: NOTIFs come out of submission order across sockets -------------------------------------
def test_notifs_arrive_out_of_submission_order():
    payload = os.urandom(BACKLOG)
    pin = ll.Pinned(payload)
    rec = Recorder()
    slow, slow_peer = stalled_pair()
    fast, fast_peer = tcp_pair()
    rx_fast = Receiver(fast_peer)
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            first = rec.op(ll.OP_SEND_ZC, slow.fileno(), addr=pin.address, len=len(payload), op_flags=FLAGS)
            submit(ring, [first])
            sent = wait_res(ring, first)[0]
            assert sent > 0 and cqes(ring, first) == [(sent, F_MORE)]
            second = rec.op(ll.OP_SEND_ZC, fast.fileno(), addr=pin.address, len=1000, op_flags=FLAGS)
            submit(ring, [second])
            wait_released(ring, rec, second)
            nothing_happens_for(ring, lambda: len(rec.released) > 1)
            rx_slow = Receiver(slow_peer)
            wait_released(ring, rec, first)
            assert released_ops(rec) == [second, first]
        slow.shutdown(socket.SHUT_WR)
        fast.shutdown(socket.SHUT_WR)
        assert rx_slow.join() == payload[:sent]
        assert rx_fast.join() == payload[:1000]
    finally:
        pin.unpin()
        for s in (slow, slow_peer, fast, fast_peer):
            s.close()


# ---- fact 14: the NOTIF waits for the peer, however long ----------------------------------------------
def test_notif_waits_for_the_peer_shutdown_does_not_release():
    """Neither side's shutdown(SHUT_WR) (a FIN) releases: the pages wait for the peer to read, or
    for an RST. (A peer's SHUT_RD is answered with an RST once more data reaches it, which releases,
    or not, depending on the window left at that moment: not tested.)"""
    payload = os.urandom(BACKLOG)
    pin = ll.Pinned(payload)
    rec = Recorder()
    client, peer = stalled_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            send = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=len(payload), op_flags=FLAGS)
            submit(ring, [send])
            assert wait_res(ring, send)[0] > 0
            nothing_happens_for(ring, lambda: rec.released)
            peer.shutdown(socket.SHUT_WR)
            nothing_happens_for(ring, lambda: rec.released, 0.5)
            client.shutdown(socket.SHUT_WR)
            nothing_happens_for(ring, lambda: rec.released, 0.5)
            reset(peer)  # SO_LINGER {1, 0}: an RST frees the sender's queue, and the pages
            wait_released(ring, rec, send, timeout=5)
    finally:
        pin.unpin()
        client.close()
        peer.close()


def test_peer_close_with_unread_data_resets_and_releases():
    """A plain close() is not what releases; here a peer closing with unread bytes in
    its receive queue answers with an RST (RFC 2525), which releases at once."""
    payload = os.urandom(BACKLOG)
    pin = ll.Pinned(payload)
    rec = Recorder()
    client, peer = stalled_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            send = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=len(payload), op_flags=FLAGS)
            submit(ring, [send])
            assert wait_res(ring, send)[0] > 0
            nothing_happens_for(ring, lambda: rec.released)
            peer.close()
            wait_released(ring, rec, send, timeout=5)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    finally:
        pin.unpin()
        client.close()


def test_buffer_changed_before_the_notif_changes_what_the_peer_gets():
    n = BACKLOG
    buf = bytearray(b"\x01" * n)
    pin = ll.Pinned(buf)
    rec = Recorder()
    client, peer = stalled_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            send = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=n, op_flags=FLAGS)
            submit(ring, [send])
            sent = wait_res(ring, send)[0]
            assert sent > 0 and not rec.released
            buf[:] = b"\x02" * n  # completed, not released
            got = read_exactly(peer, sent)
            wait_released(ring, rec, send)
        early = got.count(b"\x01")  # what reached the peer's queue before the write
        assert got == b"\x01" * early + b"\x02" * (sent - early)
        assert sent - early > 0
    finally:
        pin.unpin()
        client.close()
        peer.close()


# ---- fact 15: with REPORT_USAGE the NOTIF's res is a flag word ----------------------------------------
def test_report_usage_notif_res_is_a_flag_word(tcp, make_file):
    client, peer = tcp
    payload = os.urandom(65536)
    payload_file, _ = make_file(len(payload))
    payload_file.write_bytes(payload)
    pin = ll.Pinned(payload)
    rec = Recorder()
    rx = Receiver(peer)
    client2, peer2 = tcp_pair()
    rx2 = Receiver(peer2)
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            usage = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=len(payload),
                           op_flags=FLAGS | socket.MSG_WAITALL, zc_flags=REPORT_USAGE)
            plain = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=len(payload),
                           op_flags=FLAGS | socket.MSG_WAITALL)
            submit(ring, [usage, plain])
            wait_released(ring, rec, usage, plain)
            assert cqes(ring, usage) == [(65536, F_MORE), (ZC_COPIED_S32, F_NOTIF)]  # loopback copies
            assert cqes(ring, plain) == [(65536, F_MORE), (0, F_NOTIF)]
            assert sorted(rec.released, key=lambda x: x[0].user_data) == [(usage, True), (plain, None)]
            # A send that moved no byte zero-copy (here: it failed) also reports ZC_COPIED.
            client.shutdown(socket.SHUT_WR)
            failed = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=len(payload),
                            op_flags=FLAGS, zc_flags=REPORT_USAGE)
            submit(ring, [failed])
            wait_released(ring, rec, failed)
            assert cqes(ring, failed) == [(-errno.EPIPE, F_MORE), (ZC_COPIED_S32, F_NOTIF)]
            # raw ops are the ledger's: the engine's copied/zerocopy counts are its transfers' only
            assert ring.statistics().copied == 0 and ring.statistics().zerocopy == 0
            # the kernel flags a failed send too, but the engine counts only sends that moved bytes
            t = ring.sendfile(client2, payload_file, mode="mmap")
            assert t.released(10) == len(payload)
            client2.shutdown(socket.SHUT_WR)
            failed_t = ring.sendfile(client2, payload_file, mode="mmap")
            ring.wait([failed_t], 10, released=True)
            assert isinstance(failed_t.error, BrokenPipeError)
            notifs = [(e.transfer, e.res) for e in ring.trace() if e.notif and e.transfer is not None]
            assert notifs == [(t, ZC_COPIED_S32), (failed_t, ZC_COPIED_S32)]
            assert ring.statistics().copied == 1 and ring.statistics().zerocopy == 0
        assert rx.join() == payload * 2
        assert rx2.join() == payload
    finally:
        pin.unpin()
        client2.close()
        peer2.close()


# ---- fact 16: a registered buffer out of range or a bad index is -EFAULT --------------------------------
def test_send_zc_fixed_bad_index_or_range_is_efault(tcp):
    client, peer = tcp
    rec = Recorder()
    rx = Receiver(peer)
    with uringsend.Ring(entries=8, buffers=2, buffer_size=PAGE, trace=True) as ring:
        ring._register_pool()
        address = ring._core.pool_address
        ctypes.memmove(address(1), b"y" * 100, 100)
        bad_index = rec.op(ll.OP_SEND_ZC_FIXED, client.fileno(), addr=address(0), len=100, buf_index=5,
                           op_flags=FLAGS)
        past_end = rec.op(ll.OP_SEND_ZC_FIXED, client.fileno(), addr=address(0) + PAGE - 10, len=100,
                          buf_index=0, op_flags=FLAGS)
        good = rec.op(ll.OP_SEND_ZC_FIXED, client.fileno(), addr=address(1), len=100, buf_index=1,
                      op_flags=FLAGS)
        submit(ring, [bad_index], [past_end], [good])
        wait_released(ring, rec, bad_index, past_end, good)
        assert cqes(ring, bad_index) == [(-errno.EFAULT, F_MORE), (0, F_NOTIF)]
        assert cqes(ring, past_end) == [(-errno.EFAULT, F_MORE), (0, F_NOTIF)]
        assert cqes(ring, good) == [(100, F_MORE), (0, F_NOTIF)]
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"y" * 100


# ---- fact 17: IOSQE_CQE_SKIP_SUCCESS on SEND_ZC is -EINVAL, and no NOTIF ---------------------------------
def test_cqe_skip_success_on_send_zc_is_einval_without_notif(tcp):
    client, peer = tcp
    payload = os.urandom(100)
    pin = ll.Pinned(payload)
    rec = Recorder()
    try:
        with uringsend.Ring(entries=8, trace=True) as ring:
            send = rec.op(ll.OP_SEND_ZC, client.fileno(), addr=pin.address, len=100, op_flags=FLAGS)
            submit_flagged(ring, [(send, ll.IOSQE_CQE_SKIP_SUCCESS)])
            assert wait_res(ring, send) == [-errno.EINVAL]
            nop = rec.op(ll.OP_NOP)
            submit(ring, [nop])
            wait_res(ring, nop)
            assert ring.poll(0.2) == 0  # nothing more comes: no NOTIF was allocated
            assert cqes(ring, send) == [(-errno.EINVAL, 0)]
            assert rec.released == [] and no_orphans(ring)
        client.shutdown(socket.SHUT_WR)
        assert Receiver(peer).join() == b""
    finally:
        pin.unpin()
