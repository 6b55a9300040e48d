"""The ring and its ledger on the real kernel: round trips, links, SQ/CQ limits, close, errors."""
import errno
import os
import resource
import socket
import threading
import time
import warnings

import pytest

import uringsend
from uringsend import _lowlevel as ll
from uringsend.ledger import Op
from uringsend._uring import ffi
from helpers import Receiver, reset, tcp_pair


class Recorder:
    """Owner of raw ops in these tests: records every result and release in arrival order."""

    def __init__(self):
        self.results = []
        self.releases = []

    def _on_result(self, op, res, now):
        self.results.append((op, res))

    def _on_release(self, op, copied, now):
        self.releases.append((op, copied))


def submit(ring, *chains):
    for chain in chains:
        ring.ledger.submit(chain)


def drive(ring, until, timeout=10):
    ring.driver.run_until(until, timeout)


def test_nop_round_trip():
    rec = Recorder()
    with uringsend.Ring(entries=8) as ring:
        submit(ring, [Op(rec, ll.OP_NOP, -1)])
        drive(ring, lambda: rec.results)
        (op, res), = rec.results
        assert res == 0 and op.user_data != 0
        assert len(ring.ledger) == 0


def test_setup_prefers_single_issuer_defer_taskrun():
    with uringsend.Ring(entries=8) as ring:
        assert {"SINGLE_ISSUER", "DEFER_TASKRUN"} <= set(ring.setup_flags)


def test_send_zc_reports_sent_then_released_and_copied_on_loopback(make_file):
    path, data = make_file(1 << 20)
    client, peer = tcp_pair()
    with client, peer, uringsend.Ring() as ring:
        rx = Receiver(peer)
        t = ring.sendfile(client, path, mode="mmap")
        assert t.released(10) == len(data)
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data
        sent = [e for e in t.events if e.kind == "sent"]
        released = [e for e in t.events if e.kind == "released"]
        assert sum(e.nbytes for e in sent) == sum(e.nbytes for e in released) == len(data)
        assert all(e.copied is True for e in released)  # loopback copies SEND_ZC data
        for r in released:
            s = next(e for e in sent if e.offset == r.offset)
            assert s.t_ns <= r.t_ns
        stats = ring.statistics()
        assert stats.copied == len(released) and stats.zerocopy == 0
        assert stats.pending_notifs == 0


def test_linked_chain_head_failure_cancels_tail():
    rec = Recorder()
    r, w = os.pipe()
    try:
        with uringsend.Ring(entries=8) as ring:
            closed = os.dup(r)
            os.close(closed)  # a closed fd: the splice fails -EBADF
            submit(ring, [Op(rec, ll.OP_SPLICE, w, fd_in=closed, off_in=-1, off=-1, len=10),
                          Op(rec, ll.OP_NOP, -1), Op(rec, ll.OP_NOP, -1)])
            drive(ring, lambda: len(rec.results) == 3)
        assert [res for _, res in rec.results] == [-errno.EBADF, -errno.ECANCELED, -errno.ECANCELED]
    finally:
        os.close(r)
        os.close(w)


def test_full_sq_submits_whole_chains_and_never_splits_them():
    """Chains of 3 on a 4-entry SQ: if a chain were split, its tail would run (res 0) instead of
    being cancelled by the failing head. A chain that does not fit what is left of the SQ makes
    the engine submit what is prepared first."""
    rec = Recorder()
    r, w = os.pipe()
    try:
        with uringsend.Ring(entries=4) as ring:
            bad = os.dup(r)
            os.close(bad)  # closed after the ring exists, so the ring cannot have reused it
            assert ring.sq_entries == 4
            chains = [[Op(rec, ll.OP_SPLICE, w, fd_in=bad, off_in=-1, off=-1, len=1),
                       Op(rec, ll.OP_NOP, -1), Op(rec, ll.OP_NOP, -1)] for _ in range(20)]
            for chain in chains:
                ring.ledger.submit(chain)
            drive(ring, lambda: len(rec.results) == 60)
        by_chain = {}
        for op, res in rec.results:
            by_chain.setdefault(id(next(c for c in chains if op in c)), []).append(res)
        assert len(by_chain) == 20
        for results in by_chain.values():
            assert results == [-errno.EBADF, -errno.ECANCELED, -errno.ECANCELED]
    finally:
        os.close(r)
        os.close(w)


def test_cq_overflow_every_cqe_is_reaped():
    rec = Recorder()
    with uringsend.Ring(entries=64, cq_entries=128) as ring:
        assert ring.cq_entries == 128
        # 600 NOPs submitted before any reaping: the CQ overflows (IORING_SQ_CQ_OVERFLOW).
        ops = [Op(rec, ll.OP_NOP, -1) for _ in range(600)]
        ring.ledger.submit(ops, sqe_flags=[0] * len(ops))
        drive(ring, lambda: len(rec.results) == 600)
        assert sorted(op.user_data for op, _ in rec.results) == sorted(op.user_data for op in ops)
        assert len({op.user_data for op in ops}) == 600
        assert all(res == 0 for _, res in rec.results)


def test_close_with_notification_pending_keeps_memory_alive(make_file):
    """Peer not reading: mmap-mode notifications cannot arrive. close() must not unmap."""
    path, data = make_file(8 << 20)
    client, peer = tcp_pair(rcvbuf=4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ring = uringsend.Ring(close_timeout=0.3)
    t = ring.sendfile(client, path, mode="mmap")
    ring.poll(0.2)
    assert not t.done()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ring.close()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    stats = ring.statistics()
    assert stats.kept_alive > 0
    core = uringsend.ring._kept_alive[-1][0]
    assert core.kept and core.ptr != ffi.NULL  # the engine's memory is never freed
    assert core.mappings_busy() == 1  # still mapped: the kernel may read it
    # Close the peer with RST so the kernel drops its references, then our sockets.
    reset(peer)
    client.close()


def test_bad_fd_names_the_operation(make_file, tcp):
    path, _ = make_file(4096)
    client, _ = tcp
    with uringsend.Ring() as ring:
        s = socket.socket()
        fd = s.fileno()
        s.close()
        with pytest.raises(OSError) as exc:
            ring.sendfile(fd, path)
        assert exc.value.errno == errno.EBADF and f"fd {fd}" in str(exc.value)
        # A file fd the kernel refuses to read: READ_FIXED fails -EBADF on the transfer.
        wfd = os.open(path, os.O_WRONLY)
        try:
            t = ring.sendfile(client, wfd, mode="zerocopy")
            with pytest.raises(OSError) as exc:
                t.result(10)
            assert exc.value.errno == errno.EBADF
            assert "read_fixed on fd" in str(exc.value)
            ring.run_until_complete(10)
        finally:
            os.close(wfd)


def test_probe_reports_kernel_features():
    info = uringsend.probe()
    assert info.io_uring is True
    assert {"SEND_ZC", "SPLICE", "TEE", "READ_FIXED", "SEND"} <= set(info.opcodes)
    assert set(info.modes) >= {"splice", "zerocopy", "mmap", "copy"}
    assert info.pipe_max_size >= 4096
    assert "DEFER_TASKRUN" in info.setup_flags


def test_ring_rejects_bad_arguments():
    with pytest.raises(ValueError, match="entries"):
        uringsend.Ring(entries=0)
    with pytest.raises(ValueError, match="chunk_size"):
        uringsend.Ring(chunk_size=100)


def test_unknown_opcode_prepares_nothing():
    rec = Recorder()
    with uringsend.Ring(entries=8) as ring:
        with pytest.raises(OSError) as exc:
            ring._core.raw_submit([{"opcode": 200}])
        assert exc.value.errno == errno.EINVAL
        assert ring.statistics().pending_ops == 0
        submit(ring, [Op(rec, ll.OP_NOP, -1)])
        drive(ring, lambda: rec.results)
        assert rec.results[0][1] == 0


def test_a_batch_interrupted_before_its_dispatch_is_handed_out_again():
    """A signal handler may raise right after the engine returned a batch and before it was
    handled (the handler of a signal that interrupted the wait runs there): the batch must come
    out again on the next run, so no completion is lost."""
    rec = Recorder()
    with uringsend.Ring(entries=8) as ring:
        core = ring._core
        real_run = core.run
        raised = []

        def run_then_raise(wait_nr, timeout_ns):
            n = real_run(wait_nr, timeout_ns)
            if n and not raised:
                raised.append(n)
                raise KeyboardInterrupt
            return n

        core.run = run_then_raise
        op = Op(rec, ll.OP_NOP, -1)
        submit(ring, [op])
        with pytest.raises(KeyboardInterrupt):
            drive(ring, lambda: rec.results)
        assert raised and not rec.results  # the batch with the NOP's CQE was not handled
        drive(ring, lambda: rec.results)
        assert rec.results == [(op, 0)] and len(ring.ledger) == 0


def test_more_changes_than_one_batch_are_all_handed_out(make_file):
    """600 transfers with on_release callbacks whose completions all pile up before the ring is
    driven (COOP_TASKRUN posts them while this thread only waits for its readers): the engine hands
    changes out 256 at a time, and every callback must have run once the wait ends. (Before, the
    changes past the second batch waited for a wake that never came: an event loop stalled.)"""
    count = 600
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * count:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {count} socket pairs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * count), hard))
    path, data = make_file(65536)
    pairs = [socket.socketpair() for _ in range(count)]
    released = []
    coop = ll.SETUP_FLAGS["SUBMIT_ALL"] | ll.SETUP_FLAGS["COOP_TASKRUN"]
    try:
        with open(path, "rb") as f, uringsend.Ring(entries=1024, cq_entries=4096, setup_flags=coop) as ring:
            for a, _ in pairs:
                a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            ts = [ring.sendfile(a, f, mode="copy", on_release=released.append) for a, _ in pairs]
            assert not all(t.done() for t in ts)
            got = [bytearray() for _ in pairs]
            all_read = threading.Event()

            def read_all():
                for (_, b), buf in zip(pairs, got):
                    while len(buf) < len(data):
                        buf += b.recv(len(data) - len(buf))
                all_read.set()

            reader = threading.Thread(target=read_all, daemon=True)
            reader.start()
            # waiting on the event with a timeout returns to user space, where COOP_TASKRUN runs
            # the kernel's task work: the sends finish and their CQEs pile up, unreaped
            deadline = time.monotonic() + 30
            while not all_read.wait(0.005):
                assert time.monotonic() < deadline, "the readers did not get every byte"
            ring.wait(ts, 30, released=True)
            assert len(released) == count, len(released)
            assert sum(e.nbytes for e in released) == count * len(data)
        assert all(bytes(buf) == data for buf in got)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for a, b in pairs:
            a.close()
            b.close()
