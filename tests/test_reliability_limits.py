"""Limits: a tiny CQ that overflows, a tiny SQ, RLIMIT_MEMLOCK, an unprivileged user's pipe
budget, and io_uring blocked by seccomp the way container runtimes block it."""
import errno
import os
import resource
import select
import socket
import time

import pytest

import uringsend
from uringsend.ring import RingStatistics
from uringsend import IoUringUnavailable, Ring

from uringsend import _lowlevel as ll
from helpers import ENGINE_MODES, Receiver, Sink, sha, tcp_pair, wait_for
from _faults import assert_clean, block_io_uring, drop_to_nobody, private_file, run_child, small_buffers
from _semantics import Recorder, RingView


# ---- 6. CQ overflow (kernel fact 20) -------------------------------------------------------
def _stuff(sock):
    """Send until the socket takes no more right now; returns the bytes it took."""
    n = 0
    sock.setblocking(False)
    try:
        while True:
            n += sock.send(b"f" * 65536)
    except BlockingIOError:
        return n
    finally:
        sock.setblocking(True)


def test_cq_overflow_delivers_every_completion(make_file):
    """200 small transfers whose completions all become due at once, on a CQ of 8 entries: the
    kernel keeps the overflow, and every completion (results and notifications) still arrives.

    The engine reaps what is visible as soon as it submits, so the completions are made to pile
    up in the kernel: every socket is full when its transfer starts (its send waits for POLLOUT),
    then the peers read. With DEFER_TASKRUN the retried sends wait in task work until the ring
    enters; a raw NOP's submission (which reaps nothing) runs them all at once."""
    path, data = make_file(3000)
    pairs = [tcp_pair(rcvbuf=4096) for _ in range(200)]
    sink = None
    try:
        with open(path, "rb") as f, Ring(entries=4, cq_entries=8, buffers=4, buffer_size=4096,
                                         trace=True) as ring, RingView(ring) as view:
            assert ring.cq_entries == 8
            assert "DEFER_TASKRUN" in ring.setup_flags
            stuffed = []
            for client, _ in pairs:
                small_buffers(client)
                stuffed.append(_stuff(client))
            transfers = [ring.sendfile(client, f, mode=ENGINE_MODES[i % len(ENGINE_MODES)])
                         for i, (client, _) in enumerate(pairs)]
            sink = Sink([peer for _, peer in pairs])
            wait_for(lambda: all(n >= want for n, want in zip(sink.counts, stuffed)), 30,
                     "the peers to drain their sockets")
            # No event says when the last socket wake-ups have queued their deferred task work
            # (a ring without IORING_SETUP_TASKRUN_FLAG shows none): a grace period, not a sync.
            time.sleep(0.2)
            assert not view.cq_overflow
            nop = Recorder().op(ll.OP_NOP)
            ring.ledger.submit([nop])
            # more completions than the CQ holds: the kernel keeps the rest
            assert view.cq_overflow, "the CQ did not overflow: the test did not test anything"
            ring.run_until_complete(timeout=30)
            assert not view.cq_overflow
            assert nop.res == 0
            assert [t.result(0) for t in transfers] == [len(data)] * len(transfers)
            assert_clean(ring)
        for client, _ in pairs:
            client.close()
        got = sink.join()
        assert got == [b"f" * n + data for n in stuffed]
    finally:
        if sink is not None and sink.thread.is_alive():
            sink.stop()
        for client, peer in pairs:
            client.close()
            peer.close()


# ---- 7. SQ full: chains wait, whole, for a submission to make room (kernel fact 4) ----------
@pytest.mark.parametrize("entries", [4, 8, 16])
def test_small_sq_queues_whole_chains_and_drains(entries, make_file):
    """A ring of 4, 8 or 16 SQ entries, 24 transfers of every mode, some with a header, each file
    several chunks long: a chain that finds too little SQ room waits, whole, for the SQEs already
    prepared to be submitted; chains are never split, all data arrives. With 4 entries a splice
    chain with a header leaves no room for emptying the file slots at its tail: that happens in a
    submission of its own when the transfer ends."""
    path, data = make_file(16 * 65536 + 999)  # several chains per transfer, even with 16 entries
    pairs = [tcp_pair() for _ in range(24)]
    sink = Sink([peer for _, peer in pairs])
    headers = [b"" if i % 3 else f"header {i}\r\n".encode() for i in range(len(pairs))]
    max_queued = 0
    try:
        with open(path, "rb") as f, Ring(entries=entries, buffers=8, buffer_size=65536,
                                         chunk_size=65536, copy_chunk_size=65536,
                                         pipe_size=65536) as ring:
            assert ring.sq_entries == entries
            transfers = [ring.sendfile(client, f, mode=ENGINE_MODES[i % len(ENGINE_MODES)], header=headers[i])
                         for i, (client, _) in enumerate(pairs)]
            while not all(t.done() for t in transfers):
                ring.poll(timeout=5)
            # chains that had to wait, whole, for a submission to make SQ room
            max_queued = ring.statistics().sq_full
            assert [t.result(0) for t in transfers] == [len(data)] * len(transfers)
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        for client, _ in pairs:
            client.close()
        got = sink.join()
    finally:
        for client, peer in pairs:
            client.close()
            peer.close()
    assert max_queued > 0, "the SQ never filled: the test did not test anything"
    for i, received in enumerate(got):
        assert received == headers[i] + data, f"transfer {i} ({ENGINE_MODES[i % len(ENGINE_MODES)]})"


def test_eventfd_announces_every_completion_to_a_one_poll_per_wake_loop(make_file, tcp):
    """The event-loop pattern register_eventfd() exists for: sleep on the eventfd, then
    poll(0) once. Every completion must wake the loop (or be handed over by that poll): the
    next link member of a chain, which DEFER_TASKRUN issues from task work, included."""
    path, data = make_file(1 << 20)
    client, peer = tcp
    rx = Receiver(peer)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with Ring(copy_chunk_size=4096) as ring:
            ring.register_eventfd(efd)
            t = ring.sendfile(client, path, mode="copy")
            while not t.done():
                ready, _, _ = select.select([efd], [], [], 5)
                if not ready:
                    late = ring.poll(0)
                    pytest.fail(f"the eventfd stayed quiet for 5 s, yet poll(0) then handed over {late} "
                                f"CQE(s); {t.sent} of {len(data)} bytes sent")
                os.eventfd_read(efd)
                ring.poll(0)
            assert t.result(0) == len(data)
        client.close()
        assert rx.join() == data
    finally:
        os.close(efd)


# ---- 8. RLIMIT_MEMLOCK for an unprivileged user (docs/kernel-facts.md, fact 16) ----------------------------
MEMLOCK = 64 << 10


def child_memlock(mode, zc_budget, chunk_size):
    """As 'nobody' (no CAP_IPC_LOCK) with RLIMIT_MEMLOCK = 64 KiB: send 4 MiB."""
    f, data = private_file(4 << 20)
    client, peer = tcp_pair()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (MEMLOCK, MEMLOCK))
    drop_to_nobody()
    rx = Receiver(peer)
    out = {"zc_budget": None, "error": None}
    t = None
    try:
        with Ring(zc_budget=zc_budget, chunk_size=chunk_size, buffers=4, buffer_size=chunk_size) as ring:
            out["zc_budget"] = ring.zc_budget
            try:
                t = ring.sendfile(client, f, mode=mode)
                t.released(timeout=30)
            except OSError as exc:
                out["error"] = [exc.errno, str(exc), "sendfile" if t is None else "wait"]
            if t is not None:
                ring.run_until_complete(timeout=30)
            out["stats"] = ring.statistics().asdict()
            # whatever failed, the ring goes on: a copying send on a second connection
            c2, p2 = tcp_pair()
            rx2 = Receiver(p2)
            t2 = ring.sendfile(c2, f, mode="copy")
            out["after"] = t2.result(timeout=30)
            c2.close()
            out["after_ok"] = rx2.join() == data
            p2.close()
    except OSError as exc:
        out["error"] = [exc.errno, str(exc), "ring"]
    client.close()
    got = rx.join()
    if t is not None:
        out.update(sent=t.sent, mode=t.mode, fallback=t.fallback, settled=t.settled(),
                   peer_ok=got == data[:t.sent], complete=t.sent == len(data))
    f.close()
    peer.close()
    return out


def test_memlock_mmap_mode_fails_with_a_clear_enomem_or_stays_in_budget():
    """mode='mmap' with the default budget: either the ring's zero-copy budget keeps pinned pages
    under RLIMIT_MEMLOCK and the transfer completes, or SEND_ZC's ENOMEM is raised from wait(),
    naming the send and the limit. Never a hang, never a short transfer passed off as done."""
    code, out, err = run_child(child_memlock, "mmap", None, 1 << 20)
    assert code == 0, err[-3000:]
    if out["error"] is None:
        assert out["complete"] and out["peer_ok"] and out["settled"], out
    else:
        err_no, message, where = out["error"]
        assert err_no == errno.ENOMEM and where == "wait", out
        assert "send_zc" in message.lower() and "MEMLOCK" in message.upper(), out
        assert out["peer_ok"] and out["settled"], out
        st = RingStatistics(**out["stats"])
        assert st.pending_notifs == 0 and st.zc_bytes_unreleased == 0, st


def test_memlock_small_zc_budget_keeps_mmap_mode_under_the_limit():
    """zc_budget below the limit, 4 KiB chunks: never more pinned than allowed, all bytes sent."""
    code, out, err = run_child(child_memlock, "mmap", MEMLOCK // 2, 4096)
    assert code == 0, err[-3000:]
    assert out["error"] is None, out
    assert out["complete"] and out["peer_ok"] and out["settled"], out
    assert out["stats"]["notifs"] > 0  # it really was zero-copy sends


def test_memlock_auto_mode_completes():
    code, out, err = run_child(child_memlock, "auto", None, 1 << 20)
    assert code == 0, err[-3000:]
    assert out["error"] is None, out
    assert out["complete"] and out["peer_ok"] and out["settled"], out


def test_memlock_zerocopy_mode_cannot_register_its_pool_and_says_so():
    """Registered buffers count against RLIMIT_MEMLOCK too: 4 x 1 MiB cannot be registered under
    64 KiB. The error must reach the caller as ENOMEM (from sendfile() or wait()), not wedge."""
    code, out, err = run_child(child_memlock, "zerocopy", None, 1 << 20)
    assert code == 0, err[-3000:]
    assert out["error"] is not None and out["error"][0] == errno.ENOMEM, out
    if out["error"][2] == "wait":
        assert out["settled"] and out["peer_ok"], out
    else:  # a sendfile() that raised left no transfer behind
        assert out["stats"]["transfers_active"] == 0, out["stats"]
    assert out["after"] == 4 << 20 and out["after_ok"], out


# ---- 9. an unprivileged user's pipes (kernel fact 9) -----------------------------------------
SPAN = 256 << 10


def child_unprivileged_splice(connections):
    """As 'nobody', `connections` splice transfers at once: past pipe-user-pages-soft the pipes
    cannot grow (F_SETPIPE_SZ is EPERM) and new ones get 2 pages."""
    f, data = private_file(connections * SPAN)
    # socket buffers smaller than SPAN, and the peers read only once every transfer started: all
    # of them run at once, each holding a pipe, so the later pipes are past the soft limit
    pairs = [tcp_pair(rcvbuf=SPAN // 4) for _ in range(connections)]
    for client, _ in pairs:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SPAN // 4)
    drop_to_nobody()
    out = {}
    with Ring(trace=True) as ring:
        transfers = []
        out["peak_active"] = 0  # transfers running at once, each holding a pipe until it settles
        for i, (client, _) in enumerate(pairs):
            transfers.append(ring.sendfile(client, f, i * SPAN, SPAN, mode="splice"))
            out["peak_active"] = max(out["peak_active"], ring.statistics().transfers_active)
        sink = Sink([peer for _, peer in pairs], keep=False)
        ring.wait(transfers, timeout=60)
        out["sent"] = [t.result(0) for t in transfers]
        out["fill_sizes"] = sorted({e.len for e in ring.trace() if e.role == "fill"})
        ring.run_until_complete(timeout=30)
        out["stats"] = ring.statistics().asdict()
        out["dirty_pipes"] = ring._core.idle_pipe_bytes()
    for client, _ in pairs:
        client.close()
    got = sink.join()
    out["peer_ok"] = [got[i] == (SPAN, sha(data[i * SPAN:(i + 1) * SPAN])) for i in range(connections)]
    with open("/proc/sys/fs/pipe-user-pages-soft") as soft:
        out["pipe_user_pages_soft"] = int(soft.read())
    for _, peer in pairs:
        peer.close()
    f.close()
    return out


def test_unprivileged_user_200_splice_connections_with_clamped_pipes():
    code, out, err = run_child(child_unprivileged_splice, 200)
    assert code == 0, err[-3000:]
    assert out["sent"] == [SPAN] * 200
    assert all(out["peer_ok"]), [i for i, ok in enumerate(out["peer_ok"]) if not ok]
    # One pipe per transfer running at the same time (a settled transfer's pipe goes back to the
    # engine's pool for the next one), never more than one per transfer; none left dirty.
    assert out["peak_active"] == out["stats"]["pipes_created"] == 200, (out["peak_active"], out["stats"])
    assert out["dirty_pipes"] == 0, out["stats"]
    if out["pipe_user_pages_soft"] and out["pipe_user_pages_soft"] < 200 * 256:
        # 200 pipes of 1 MiB are past the soft limit: some chains ran through small pipes
        assert out["fill_sizes"][0] < SPAN, out["fill_sizes"]


# ---- 10. io_uring blocked by seccomp ---------------------------------------------------------
def child_seccomp(err_name):
    block_io_uring(getattr(errno, err_name))
    f, data = private_file(1 << 20)
    out = {"explicit": {}}
    try:
        Ring()
        out["ring"] = None
    except IoUringUnavailable as exc:
        out["ring"] = [exc.errno, str(exc)]
    for mode in ENGINE_MODES:
        client, peer = tcp_pair()
        try:
            uringsend.sendfile(client, f, mode=mode)
            out["explicit"][mode] = None
        except IoUringUnavailable as exc:
            out["explicit"][mode] = [exc.errno, str(exc)]
        client.close()
        peer.close()
    client, peer = tcp_pair()
    rx = Receiver(peer)
    sent = uringsend.sendfile(client, f, 7, headers=b"HTTP/1.1 200 OK\r\n\r\n", trailers=b"end",
                              mode="auto")
    position = f.tell()
    client.close()
    got = rx.join()
    peer.close()
    out["auto"] = {"sent": sent, "position": position, "fallback": uringsend.blocking.fallback(),
                   "ok": got == b"HTTP/1.1 200 OK\r\n\r\n" + data[7:] + b"end", "expected": len(data) - 7}
    info = uringsend.probe()
    out["probe"] = [info.io_uring, info.io_uring_error]
    f.close()
    return out


@pytest.mark.parametrize("err_name", ["EPERM", "ENOSYS"])
def test_io_uring_blocked_by_seccomp(err_name):
    code, out, err = run_child(child_seccomp, err_name)
    assert code == 0, err[-3000:]
    err_no = getattr(errno, err_name)
    assert out["ring"] is not None and out["ring"][0] == err_no, out
    assert err_name in out["ring"][1] and "seccomp" in out["ring"][1]
    for mode in ENGINE_MODES:
        assert out["explicit"][mode] is not None and out["explicit"][mode][0] == err_no, (mode, out)
    auto = out["auto"]
    assert auto["ok"] and auto["sent"] == auto["expected"] and auto["position"] == 7 + auto["sent"], auto
    calls, why = auto["fallback"]
    assert calls == 1 and "io_uring unavailable" in why and err_name in why, auto
    assert out["probe"] == [False, err_name]
