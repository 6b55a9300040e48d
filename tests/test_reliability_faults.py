"""Faults in flight: a file shrinking under a chain, a peer resetting, a peer that stops reading,
cancellation racing completion, and the orphan notification of a link-cancelled SEND_ZC.

The promise checked everywhere: a buffer is never reused while the kernel holds it, and the peer
gets exactly the bytes the transfer says it sent — none lost, none invented.
"""
import collections
import errno
import mmap
import os
import random
import select
import signal
import socket
import threading
import time

import pytest

import uringsend
from uringsend.ring import RingStatistics
from uringsend import _lowlevel as ll
from uringsend import TransferCancelled

from helpers import ENGINE_MODES, RELEASING, Receiver, reset, sha, tcp_pair
from _faults import CHUNK, assert_clean, private_file, run_child, small_buffers, small_ring

F_MORE = ll.IORING_CQE_F_MORE
F_NOTIF = ll.IORING_CQE_F_NOTIF
PAGE = mmap.PAGESIZE


def notifs_per_op(trace):
    """user_data -> number of NOTIF CQEs, for every zero-copy send that must get exactly one:
    a result with F_MORE, or -ECANCELED (a link-cancelled SEND_ZC gets no F_MORE, yet a NOTIF).
    ``trace``: ``Ring.trace()``."""
    due = {}
    for e in trace:
        if not e.zerocopy:
            continue
        if e.notif:
            due[e.user_data] = due.get(e.user_data, 0) + 1
        elif e.flags & F_MORE or e.res == -errno.ECANCELED:
            due.setdefault(e.user_data, 0)
    return due


# ---- 1. a short splice at the end of the file breaks the chain (kernel fact 1) ------------
@pytest.mark.parametrize("mode", ENGINE_MODES)
@pytest.mark.parametrize("cut", [2 * CHUNK, CHUNK + 100_000], ids=["at-chunk", "mid-chunk"])
def test_file_truncated_under_a_chain_ends_short_with_exact_bytes(mode, cut, make_file):
    """The file shrinks while the first send of a chain is blocked (the peer does not read yet),
    so the later fills of that chain meet the new EOF: a short or empty fill breaks the link.

    A send through a mapping cannot see an EOF inside a page: truncate() zero-fills the rest of
    that page, and those zeros go out. Then the transfer must fail with EFAULT saying how many
    bytes past the new end were zeros, and ``sent`` must count what the peer got."""
    path, data = make_file(8 * CHUNK)
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    gate = threading.Event()
    rx = Receiver(peer, gate)
    zeros = (-cut) % PAGE if mode in ("mmap", "copy") else 0
    try:
        with small_ring(trace=True) as ring:
            t = ring.sendfile(client, path, mode=mode)
            # The first send cannot finish while the peer does not read, and every later member
            # of the chain is linked behind it: none of them has looked at the file yet.
            ring.poll(0)
            assert t.sent < CHUNK
            os.truncate(path, cut)
            gate.set()
            if zeros:
                with pytest.raises(OSError) as info:
                    t.result(timeout=30)
                assert info.value.errno == errno.EFAULT
                assert f"{zeros} bytes" in str(info.value) and "zeros" in str(info.value)
            else:
                assert t.result(timeout=30) == cut
                assert t.error is None and t.short and t.count == 8 * CHUNK
            assert t.sent == cut + zeros
            # members of the chain cancelled by the break (not the FILES_UPDATE at its tail)
            broken = [e.res for e in ring.trace()
                      if e.role in ("fill", "send") and e.res == -errno.ECANCELED]
            if mode in ("splice", "zerocopy"):
                assert broken, "the short fill did not break the chain"
            if mode == "splice":
                # a mid-chunk cut leaves the fill's bytes in the pipe: accounted and drained
                assert t.stranded == cut % CHUNK
            else:
                assert t.stranded == 0
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        client.close()
        got = rx.join()
    finally:
        gate.set()
        client.close()
        peer.close()
    assert len(got) == cut + zeros
    assert sha(got) == sha(data[:cut] + bytes(zeros))


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_count_past_eof_sends_the_file_and_reports_short(mode, make_file, tcp):
    path, data = make_file(3 * CHUNK + 123)
    client, peer = tcp
    rx = Receiver(peer)
    with small_ring() as ring:
        t = ring.sendfile(client, path, 5, 10 * CHUNK, mode=mode)
        assert t.result(timeout=30) == len(data) - 5
        assert t.short and t.count == 10 * CHUNK and t.stranded == 0
        ring.run_until_complete(timeout=30)
        assert_clean(ring)
    client.close()
    assert rx.join() == data[5:]


# ---- 2. the peer resets mid-transfer --------------------------------------------------------
def child_peer_reset(mode):
    """In a child with SIGPIPE at its default (death): a peer that resets mid-transfer must end
    the transfer with ECONNRESET/EPIPE and nothing else."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    f, data = private_file(16 << 20)
    client, peer = tcp_pair(rcvbuf=64 << 10)
    small_buffers(client, 64 << 10)
    got = bytearray()

    def read_then_reset():
        while len(got) < 300_000:
            got.extend(peer.recv(1 << 16))
        reset(peer)

    reader = threading.Thread(target=read_then_reset)
    out = {}
    with small_ring(trace=True) as ring:
        t = ring.sendfile(client, f, mode=mode)
        reader.start()
        try:
            t.result(timeout=30)
            out["error"] = None
        except OSError as exc:
            out["error"] = type(exc).__name__
            out["errno"] = exc.errno
            out["message"] = str(exc)
        reader.join()
        ring.run_until_complete(timeout=30)
        out["settled"] = t.settled()
        out["sent"] = t.sent
        out["released"] = t.released_bytes()
        offsets = [e.offset for e in t.events if e.kind == uringsend.RELEASED]
        out["released_twice"] = len(offsets) - len(set(offsets))
        out["peer_prefix_ok"] = bytes(got) == data[:len(got)]
        out["notifs_per_op"] = sorted(set(notifs_per_op(ring.trace()).values()))
        out["stats"] = ring.statistics().asdict()
        out["dirty_pipes"] = ring._core.idle_pipe_bytes()
    client.close()
    f.close()
    return out


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_peer_reset_mid_transfer_fails_cleanly_without_sigpipe(mode):
    code, out, err = run_child(child_peer_reset, mode)
    assert code == 0, f"child died ({code}; -{signal.SIGPIPE} is SIGPIPE): {err[-2000:]}"
    assert out["error"] in ("ConnectionResetError", "BrokenPipeError"), out
    assert out["errno"] in (errno.ECONNRESET, errno.EPIPE)
    assert "fd " in out["message"]  # the message names the operation and the socket
    assert out["peer_prefix_ok"]
    assert out["settled"]
    st = RingStatistics(**out["stats"])
    assert st.pending_notifs == 0 and st.pending_ops == 0 and st.orphan_cqes == 0, st
    assert st.buffers_free == st.buffers_total, st
    assert st.zc_bytes_unreleased == 0, st
    assert out["dirty_pipes"] == 0
    if mode in RELEASING:
        # every chunk the socket took was released exactly once, and nothing else was
        assert out["released"] == out["sent"] and out["released_twice"] == 0, out
    if mode in ("zerocopy", "mmap"):
        assert out["notifs_per_op"] == [1], out


def child_write_after_reset():
    """The control: a plain write() to a reset socket, SIGPIPE at its default, kills the child."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    client, peer = tcp_pair()
    reset(peer)
    for _ in range(3):  # the first write reports ECONNRESET; a later one raises SIGPIPE
        try:
            os.write(client.fileno(), b"x" * 1000)
        except ConnectionResetError:
            pass
    return "survived"


def test_the_sigpipe_check_can_see_a_sigpipe():
    code, out, err = run_child(child_write_after_reset)
    assert code == -signal.SIGPIPE, (code, out, err[-2000:])


def child_transfer_after_reset_was_reported(mode):
    """A second transfer on a connection whose reset the first one already reported: the socket
    answers EPIPE now (and would raise SIGPIPE for a send without MSG_NOSIGNAL)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    f, data = private_file(1 << 20)
    client, peer = tcp_pair()
    reset(peer)
    out = []
    with small_ring() as ring:
        for _ in range(2):
            t = ring.sendfile(client, f, mode=mode)
            try:
                t.result(timeout=30)
                out.append(None)
            except OSError as exc:
                out.append(type(exc).__name__)
        ring.run_until_complete(timeout=30)
        assert_clean(ring)
    client.close()
    f.close()
    return out


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_transfer_after_a_reported_reset_fails_with_epipe_without_sigpipe(mode):
    code, out, err = run_child(child_transfer_after_reset_was_reported, mode)
    assert code == 0, f"child died ({code}; -{signal.SIGPIPE} is SIGPIPE): {err[-2000:]}"
    assert out == ["ConnectionResetError", "BrokenPipeError"], out


# ---- 3. the peer stops reading ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_stalled_peer_costs_no_cpu_and_cancel_ends_it(mode, make_file):
    path, data = make_file(16 << 20)
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    try:
        with small_ring() as ring:
            t = ring.sendfile(client, path, mode=mode)
            while not select.select([peer], [], [], 0)[0]:
                ring.poll(timeout=1)  # until the socket has taken what it can
            cpu = time.process_time()
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                ring.poll(timeout=0.25)
                with pytest.raises(TimeoutError):
                    t.result(timeout=0.25)
            cpu = time.process_time() - cpu  # every thread, io-wq workers included
            assert cpu < 0.1, f"{cpu:.3f} s of CPU over 2 s of a stalled transfer"
            assert not t.done()

            t.cancel()
            with pytest.raises(TransferCancelled) as info:
                t.result(timeout=10)
            assert info.value.errno == errno.ECANCELED
            assert t.done() and t.error is info.value
            sent = t.sent
            st = ring.statistics()
            if mode in ("zerocopy", "mmap"):
                # the socket still holds pages of sends that finished: no release until it lets go
                assert st.pending_notifs > 0, st
                assert not t.settled()
            if mode == "zerocopy":
                assert st.buffers_free < st.buffers_total, st
            client.shutdown(socket.SHUT_WR)
            got = Receiver(peer).join()
            ring.run_until_complete(timeout=10)
            assert t.settled()
            assert_clean(ring)
    finally:
        client.close()
        peer.close()
    assert len(got) == sent
    assert sha(got) == sha(data[:sent])


@pytest.mark.parametrize("mode", ["zerocopy", "mmap"])
def test_buffers_held_by_a_stalled_socket_return_on_peer_reset(mode, make_file):
    path, data = make_file(4 << 20)
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    try:
        with small_ring() as ring:
            t = ring.sendfile(client, path, mode=mode)
            while not select.select([peer], [], [], 0)[0]:
                ring.poll(timeout=1)
            t.cancel()
            with pytest.raises(TransferCancelled):
                t.result(timeout=10)
            assert ring.statistics().pending_notifs > 0
            reset(peer)  # an RST frees the socket's queue, and with it the pages
            ring.run_until_complete(timeout=10)
            assert t.settled()
            assert t.released_bytes() == t.sent
            assert_clean(ring)
    finally:
        client.close()
        peer.close()


# ---- 4. cancellation racing completion --------------------------------------------------------
def _cancel_race(iterations, make_file):
    path, data = make_file(1 << 20)
    client, peer = tcp_pair()
    rx = Receiver(peer)
    rng = random.Random(1234)
    expected = bytearray()
    outcomes = collections.Counter()
    with open(path, "rb") as f, small_ring() as ring:
        for i in range(iterations):
            mode = ENGINE_MODES[i % len(ENGINE_MODES)]
            offset = rng.randrange(len(data))
            count = rng.randrange(1, 4 * CHUNK)
            t = ring.sendfile(client, f, offset, count, mode=mode)
            for _ in range(rng.randrange(3)):
                ring.poll(0)
            t.cancel()
            try:
                sent = t.result(timeout=10)
            except TransferCancelled as exc:
                assert exc.errno == errno.ECANCELED
                assert t.sent < min(count, len(data) - offset)
                outcomes["cancelled"] += 1
            else:
                assert sent == t.sent == min(count, len(data) - offset)
                outcomes["completed"] += 1
            assert t.done() and t.stranded == 0 or mode == "splice"
            expected += data[offset:offset + t.sent]
        ring.run_until_complete(timeout=30)
        assert_clean(ring)
    client.close()
    got = rx.join()
    peer.close()
    assert outcomes["cancelled"] and outcomes["completed"], outcomes
    assert len(got) == len(expected)
    assert sha(got) == sha(expected)


def test_cancel_racing_completion_has_one_outcome(make_file):
    _cancel_race(1000, make_file)


@pytest.mark.slow
def test_cancel_racing_completion_has_one_outcome_10k(make_file):
    _cancel_race(10_000, make_file)


# ---- 5. the orphan notification of a link-cancelled SEND_ZC (kernel fact 12) ---------------
def test_link_cancelled_send_zc_keeps_its_buffer_until_its_notif(make_file, tcp, monkeypatch):
    """READ_FIXED fails (the fd is write-only), so its linked SEND_ZC completes -ECANCELED
    without F_MORE, and a NOTIF follows anyway. The only buffer must stay out of the pool until
    that NOTIF, and the next transfer may use it only then.

    The buffer pool lives in the engine, so it is looked at each time control comes back from
    it (sendfile, every run). The header puts a send ahead of the READ_FIXED in the chain: the
    READ_FIXED then fails from task work, and the cancelled SEND_ZC's result reaches the CQ one
    task-work pass before its NOTIF, so that the engine hands control back between the two."""
    path, data = make_file(3 * CHUNK)
    client, peer = tcp
    rx = Receiver(peer)
    wronly = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    seen = []  # (CQEs in the trace, buffers free) each time the engine handed control back
    try:
        with small_ring(buffers=1, trace=True) as ring:
            def look():
                seen.append((len(ring.trace()), ring.statistics().buffers_free))

            real_run = ring._core.run

            def run(*args):
                try:
                    return real_run(*args)
                finally:
                    look()
            monkeypatch.setattr(ring._core, "run", run)
            broken = ring.sendfile(client, wronly, mode="zerocopy", header=b"HEAD")
            look()
            with pytest.raises(OSError) as info:
                broken.result(timeout=10)
            assert info.value.errno == errno.EBADF
            assert "read_fixed" in str(info.value)
            looks_before_good = len(seen)
            good = ring.sendfile(client, path, mode="zerocopy")
            look()
            assert good.released(timeout=10) == len(data)
            ring.run_until_complete(timeout=10)
            assert_clean(ring)
            st = ring.statistics()
            assert st.buffers_total == 1
            trace = ring.trace()
    finally:
        os.close(wronly)
    client.close()
    assert rx.join() == b"HEAD" + data

    cancelled = [(i, e) for i, e in enumerate(trace) if e.transfer is broken and e.zerocopy and not e.notif]
    assert len(cancelled) == 1
    at, send = cancelled[0]
    assert send.res == -errno.ECANCELED and not send.flags & F_MORE, "the kernel's [KF 12] case did not happen"
    notif = [i for i, e in enumerate(trace) if e.user_data == send.user_data and e.notif]
    assert len(notif) == 1, "the link-cancelled SEND_ZC got no NOTIF (or several)"
    # The buffer stayed out of the pool after the -ECANCELED result, until its NOTIF was handled,
    # and went back then.
    between = [free for n, free in seen if at < n <= notif[0]]
    assert between, f"never looked between the result and the NOTIF: {seen}, {at}, {notif}"
    assert between == [0] * len(between), (seen, at, notif)
    after = [free for n, free in seen[:looks_before_good] if n > notif[0]]
    assert after, f"never looked after the NOTIF before the next transfer: {seen}, {notif}"
    assert after == [1] * len(after), (seen, at, notif)
    # The next transfer's first use of the buffer completed after that NOTIF.
    good_fills = [i for i, e in enumerate(trace) if e.transfer is good and e.op == "READ_FIXED"]
    assert good_fills and min(good_fills) > notif[0]
