"""Kernel facts about SPLICE (docs/kernel-facts.md, facts 5-10 and 26), checked at the raw op level on
the real kernel, then in the engine that relies on them.

5        test_splice_always_runs_in_an_io_wq_worker,
         test_each_blocked_splice_holds_a_worker_up_to_max_workers
6, 26   test_nonblocking_splice_completes_with_a_literal_eagain,
         test_send_on_a_full_nonblocking_socket_is_poll_retried,
         test_splice_engine_rearms_with_poll_after_eagain
7        test_splice_offsets, test_sendfile_leaves_the_file_position_alone
8        test_cancelling_a_running_splice_leaks_erestartsys, test_splice_engine_counts_bytes_a_cancel_strands
9        test_pipe_sizes_round_up_and_stop_at_pipe_max_size, test_new_pipes_shrink_past_pipe_user_pages_soft
10       test_splice_is_a_mapping_later_writes_reach_the_peer
9, 1   test_unaligned_file_to_pipe_splice_needs_one_page_more,
         test_splice_engine_never_asks_more_than_the_pipe_holds
"""
import errno
import fcntl
import os
import select
import socket
import threading

import pytest

import uringsend
from uringsend import TransferCancelled
from uringsend import _lowlevel as ll
from helpers import Receiver, io_wq_workers, tcp_pair, unix_pair, wait_for
from _faults import drop_to_nobody, private_file, run_child
from _semantics import (ERESTARTSYS, F_MORE, F_NOTIF, PAGE, SPLICE_F_NONBLOCK, Recorder, cancel, cqes, fill,
                        in_thread, pipe_pending, nothing_happens_for, stalled_pair, submit, wait_released,
                        wait_res)

CAP_SYS_RESOURCE = 24


# ---- fact 5: SPLICE always runs in an io-wq worker; each blocked one holds a worker -------------
def _workers_for_inline_ops_and_one_splice(path):
    tid = threading.get_native_id()  # a new thread: no io-wq workers yet
    rec = Recorder()
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            send = rec.op(ll.OP_SEND, a.fileno(), addr=0, len=0)
            nop = rec.op(ll.OP_NOP)
            submit(ring, [send], [nop])
            assert wait_res(ring, send, nop) == [0, 0]
            inline = io_wq_workers(tid)
            # Nothing here can block (a file into an empty pipe), yet it goes to a worker.
            splice = rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=0, off=-1, len=4096)
            submit(ring, [splice])
            assert wait_res(ring, splice) == [4096]
            return inline, io_wq_workers(tid)
    finally:
        for x in (fd, r, w):
            os.close(x)
        a.close()
        b.close()


def test_splice_always_runs_in_an_io_wq_worker(make_file):
    path, _ = make_file(4096)
    assert in_thread(_workers_for_inline_ops_and_one_splice, path) == (0, 1)


def _blocked_splices(n, max_workers):
    tid = threading.get_native_id()
    rec = Recorder()
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        with uringsend.Ring(max_workers=max_workers) as ring:
            ops = [rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=10) for _ in range(n)]
            submit(ring, *[[op] for op in ops])
            expected = min(n, max_workers)
            wait_for(lambda: io_wq_workers(tid) >= expected, what=f"{expected} io-wq workers")
            nothing_happens_for(ring, lambda: any(op.res is not None for op in ops))  # all blocked on the empty pipe
            seen = io_wq_workers(tid)
            os.close(w)  # no writer left: every splice, running or queued, reads EOF
            w = None
            results = wait_res(ring, *ops)
        return seen, results
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
        a.close()
        b.close()


@pytest.mark.parametrize("max_workers,expected", [(32, 6), (2, 2)])
def test_each_blocked_splice_holds_a_worker_up_to_max_workers(max_workers, expected):
    seen, results = in_thread(_blocked_splices, 6, max_workers)
    assert seen == expected
    assert results == [0] * 6


# ---- fact 6 and 26: SPLICE gives a literal -EAGAIN; SEND is poll-retried ------------------------
def test_nonblocking_splice_completes_with_a_literal_eagain():
    rec = Recorder()
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            flagged = rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=10,
                             op_flags=SPLICE_F_NONBLOCK)
            submit(ring, [flagged])
            assert wait_res(ring, flagged) == [-errno.EAGAIN]  # an empty pipe, not a wait

            os.set_blocking(r, False)
            empty = rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=10)
            submit(ring, [empty])
            assert wait_res(ring, empty) == [-errno.EAGAIN]
            os.set_blocking(r, True)

            filled = fill(a)
            a.setblocking(False)
            os.write(w, b"x" * 100)
            full = rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=100)
            submit(ring, [full])
            assert wait_res(ring, full) == [-errno.EAGAIN]  # a full O_NONBLOCK socket
            assert pipe_pending(r) == 100
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()
    assert filled > 0


@pytest.mark.parametrize("opcode", [ll.OP_SEND, ll.OP_SEND_ZC], ids=["SEND", "SEND_ZC"])
def test_send_on_a_full_nonblocking_socket_is_poll_retried(opcode):
    payload = os.urandom(1000)
    pin = ll.Pinned(payload)
    rec = Recorder()
    client, peer = stalled_pair(sndbuf=256 << 10)
    try:
        filled = fill(client)
        client.setblocking(False)
        with uringsend.Ring(entries=8, trace=True) as ring:
            send = rec.op(opcode, client.fileno(), addr=pin.address, len=len(payload),
                          op_flags=socket.MSG_NOSIGNAL)
            submit(ring, [send])
            nothing_happens_for(ring, lambda: send.res is not None)  # no -EAGAIN: it waits for POLLOUT
            rx = Receiver(peer)
            assert wait_res(ring, send) == [len(payload)]
            if opcode == ll.OP_SEND_ZC:
                wait_released(ring, rec, send)
                assert cqes(ring, send) == [(len(payload), F_MORE), (0, F_NOTIF)]
            else:
                assert cqes(ring, send) == [(len(payload), 0)]
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == b"f" * filled + payload
    finally:
        pin.unpin()
        client.close()
        peer.close()


def test_splice_engine_rearms_with_poll_after_eagain(make_file):
    path, data = make_file(4 << 20)
    client, peer = stalled_pair(sndbuf=256 << 10)
    client.setblocking(False)
    gate = threading.Event()
    rx = Receiver(peer, gate)
    try:
        with uringsend.Ring(pipe_size=65536, trace=True) as ring:
            t = ring.sendfile(client, path, mode="splice")
            ring.driver.run_until(lambda: any(e.role == "send" and e.res == -errno.EAGAIN for e in ring.trace()), 10)
            gate.set()
            assert t.result(30) == len(data)
            ring.run_until_complete(10)
            trace = ring.trace()
        first_eagain = next(i for i, e in enumerate(trace) if e.role == "send" and e.res == -errno.EAGAIN)
        assert trace[first_eagain].op == "SPLICE"
        polls = [e for e in trace[first_eagain:] if e.role == "poll"]
        assert polls and all(e.op == "POLL_ADD" and e.res & select.POLLOUT for e in polls)
        client.close()
        assert rx.join() == data
    finally:
        gate.set()
        client.close()
        peer.close()


# ---- fact 7: offsets ----------------------------------------------------------------------------
def test_splice_offsets(make_file):
    path, data = make_file(4096)
    rec = Recorder()
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        os.lseek(fd, 100, os.SEEK_SET)
        with uringsend.Ring(entries=8) as ring:
            at_pos = rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=-1, off=-1, len=50)
            submit(ring, [at_pos])
            assert wait_res(ring, at_pos) == [50]
            assert os.read(r, 100) == data[100:150]
            assert os.lseek(fd, 0, os.SEEK_CUR) == 150

            explicit = rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=1000, off=-1, len=50)
            submit(ring, [explicit])
            assert wait_res(ring, explicit) == [50]
            assert os.read(r, 100) == data[1000:1050]
            assert os.lseek(fd, 0, os.SEEK_CUR) == 150

            pipe_offset = rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=0, off=0, len=50)
            no_pipe = rec.op(ll.OP_SPLICE, a.fileno(), fd_in=fd, off_in=0, off=-1, len=50)
            submit(ring, [pipe_offset], [no_pipe])
            assert wait_res(ring, pipe_offset, no_pipe) == [-errno.ESPIPE, -errno.EINVAL]
        assert pipe_pending(r) == 0
    finally:
        for x in (fd, r, w):
            os.close(x)
        a.close()
        b.close()


@pytest.mark.parametrize("mode", ["splice", "zerocopy", "mmap", "copy"])
def test_sendfile_leaves_the_file_position_alone(mode, make_file, tcp):
    path, data = make_file(100_000)
    client, peer = tcp
    rx = Receiver(peer)
    with open(path, "rb") as f, uringsend.Ring() as ring:
        f.seek(123)
        t = ring.sendfile(client, f, 1000, mode=mode)
        assert t.result(10) == len(data) - 1000
        ring.run_until_complete(10)
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 123
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data[1000:]


# ---- fact 8: cancelling a running splice --------------------------------------------------------
def test_cancelling_a_running_splice_leaks_erestartsys():
    rec = Recorder()
    r, w = os.pipe()
    a, b = unix_pair()
    try:
        filled = fill(a)
        os.write(w, b"x" * 1000)
        with uringsend.Ring(entries=8) as ring:
            splice = rec.op(ll.OP_SPLICE, a.fileno(), fd_in=r, off_in=-1, off=-1, len=1000)
            submit(ring, [splice])
            nothing_happens_for(ring, lambda: splice.res is not None)  # blocked in a worker: the socket is full
            assert cancel(ring, rec, splice) == -errno.EALREADY
            assert wait_res(ring, splice) == [-ERESTARTSYS]
        assert pipe_pending(r) == 1000  # nothing left the pipe
        a.shutdown(socket.SHUT_WR)
        assert Receiver(b).join() == b"f" * filled
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_splice_engine_counts_bytes_a_cancel_strands(make_file):
    path, _ = make_file(10_000)
    a, b = unix_pair()
    try:
        filled = fill(a)
        with uringsend.Ring(pipe_size=65536, trace=True) as ring:
            t = ring.sendfile(a, path, mode="splice")
            ring.driver.run_until(lambda: any(e.role == "fill" for e in ring.trace()), 10)
            nothing_happens_for(ring, lambda: t.done())
            t.cancel()
            with pytest.raises(TransferCancelled):
                t.result(10)
            ring.run_until_complete(10)
            results = [(e.role, e.res) for e in ring.trace()]
            # Around the transfer's own ops: the FILES_UPDATE that installed its socket and file
            # (2 slots), the one at its chain's tail, cancelled with the chain, and the one that
            # emptied the slots once the transfer ended.
            assert results == [("install", 2), ("fill", 10_000), ("cancel", -errno.EALREADY),
                               ("send", -ERESTARTSYS), ("unslot", -errno.ECANCELED), ("unslot", 2)]
            assert t.sent == 0 and t.stranded == 10_000
            # the pipe went back to the engine's pool, empty
            assert ring.statistics().pipes_idle == 1 and ring._core.idle_pipe_bytes() == 0
        a.shutdown(socket.SHUT_WR)
        assert Receiver(b).join() == b"f" * filled
    finally:
        a.close()
        b.close()


# ---- fact 9: pipe sizes -------------------------------------------------------------------------
def _has_cap(bit):
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(eff.split()[1], 16) >> bit & 1)


def test_pipe_sizes_round_up_and_stop_at_pipe_max_size(make_file):
    with open("/proc/sys/fs/pipe-max-size") as f:
        max_size = int(f.read())
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 65536
        assert fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 5000) == 2 * PAGE
        assert fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 3 * PAGE + 1) == 4 * PAGE  # a power of two pages
        assert fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, max_size) == max_size
        if _has_cap(CAP_SYS_RESOURCE):
            pytest.skip("CAP_SYS_RESOURCE may exceed pipe-max-size")
        with pytest.raises(PermissionError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, max_size + 1)
    finally:
        os.close(r)
        os.close(w)
    # A ring asked for bigger pipes gets pipe-max-size ones (not the 64 KiB a refused size leaves):
    # a fill from offset 0 asks for exactly what the engine's pipe holds.
    path, data = make_file(max_size + PAGE)
    a, b = unix_pair()
    rx = Receiver(b)
    try:
        with uringsend.Ring(pipe_size=4 * max_size, trace=True) as ring:
            t = ring.sendfile(a, path, mode="splice")
            assert t.result(10) == len(data)
            ring.run_until_complete(10)
            assert next(e.len for e in ring.trace() if e.role == "fill") == max_size
        a.close()
        assert rx.join() == data
    finally:
        a.close()
        b.close()


def child_pipes_past_the_soft_limit():
    """As 'nobody' (no CAP_SYS_RESOURCE/CAP_SYS_ADMIN; pipe pages are counted per user): grow
    pipes to 1 MiB until a new pipe comes out small, then send a file through uringsend."""
    f, data = private_file(300_000)
    drop_to_nobody()
    big = []
    try:
        while len(big) < 1000:
            r, w = os.pipe()
            big.append((r, w))
            if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) != 65536:
                break
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        out = {"grown": len(big) - 1, "new_size": fcntl.fcntl(big[-1][1], fcntl.F_GETPIPE_SZ)}
        try:
            fcntl.fcntl(big[-1][1], fcntl.F_SETPIPE_SZ, 65536)
            out["grow_new"] = "ok"
        except OSError as exc:
            out["grow_new"] = errno.errorcode[exc.errno]
        a, b = unix_pair()
        with uringsend.Ring(pipe_size=1 << 20, trace=True) as ring:
            rx = Receiver(b)
            t = ring.sendfile(a, f, mode="splice")
            out["sent"] = t.result(30)
            ring.run_until_complete(10)
            # the engine's pipe: a fill from offset 0 asks for exactly what the pipe holds
            out["capacity"] = next(e.len for e in ring.trace() if e.role == "fill")
        a.close()
        out["delivered"] = rx.join() == data
        b.close()
        return out
    finally:
        for r, w in big:
            os.close(r)
            os.close(w)
        f.close()


def test_new_pipes_shrink_past_pipe_user_pages_soft():
    with open("/proc/sys/fs/pipe-user-pages-soft") as f:
        soft = int(f.read())
    if not soft:
        pytest.skip("pipe-user-pages-soft is 0: no soft limit")
    code, out, err = run_child(child_pipes_past_the_soft_limit)
    assert code == 0, err[-2000:]
    assert out == {"grown": soft * PAGE // (1 << 20), "new_size": 2 * PAGE, "grow_new": "EPERM",
                   "sent": 300_000, "capacity": 2 * PAGE, "delivered": True}


# ---- fact 10: splice is a mapping, not a copy -----------------------------------------------------
def test_splice_is_a_mapping_later_writes_reach_the_peer(make_file):
    path, data = make_file(65536)
    rec = Recorder()
    fd = os.open(path, os.O_RDWR)
    r, w = os.pipe()
    client, peer = tcp_pair()
    try:
        with uringsend.Ring(entries=8) as ring:
            chain = [rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=0, off=-1, len=65536),
                     rec.op(ll.OP_SPLICE, client.fileno(), fd_in=r, off_in=-1, off=-1, len=65536)]
            submit(ring, chain)
            assert wait_res(ring, *chain) == [65536, 65536]
        assert os.sendfile(client.fileno(), fd, 0, 65536) == 65536  # blocking sendfile: the same
        changed = bytes(x ^ 0xFF for x in data)
        assert os.pwrite(fd, changed, 0) == 65536
        client.shutdown(socket.SHUT_WR)
        assert Receiver(peer).join() == changed + changed  # every byte is the later write
    finally:
        for x in (fd, r, w):
            os.close(x)
        client.close()
        peer.close()


# ---- facts 9 and 1: a file->pipe splice fills at most one page per pipe slot ---------------------
@pytest.mark.parametrize("offset", [0, PAGE, 100, PAGE - 1])
def test_unaligned_file_to_pipe_splice_needs_one_page_more(offset, make_file):
    path, data = make_file(4 * 65536)
    rec = Recorder()
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    try:
        capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        with uringsend.Ring(entries=8) as ring:
            splice = rec.op(ll.OP_SPLICE, w, fd_in=fd, off_in=offset, off=-1, len=capacity)
            submit(ring, [splice])
            got = wait_res(ring, splice)[0]
        assert got == capacity - offset % PAGE
        assert os.read(r, capacity) == data[offset:offset + got]
    finally:
        for x in (fd, r, w):
            os.close(x)


def test_splice_engine_never_asks_more_than_the_pipe_holds(make_file, tcp):
    path, data = make_file(300_000)
    client, peer = tcp
    rx = Receiver(peer)
    with uringsend.Ring(pipe_size=16384, trace=True) as ring:
        t = ring.sendfile(client, path, 100, mode="splice")
        assert t.result(10) == len(data) - 100
        ring.run_until_complete(10)
        trace = ring.trace()
    fills = [e for e in trace if e.role == "fill"]
    assert all(e.op == "SPLICE" and e.len <= 16384 and e.res == e.len for e in fills)
    ends = [100 + sum(e.len for e in fills[:i + 1]) for i in range(len(fills))]  # each fill is whole
    assert all(end % PAGE == 0 for end in ends[:-1])
    assert fills[0].len == 16384 - 100
    assert sum(e.res for e in fills) == len(data) - 100
    assert not [e.res for e in trace if e.res < 0]
    assert t.stranded == 0
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data[100:]
