"""Ring.sendfile in every mode: byte-identical delivery, events, edge cases and bad input."""
import errno
import os
import selectors
import socket
import threading
import time

import pytest

import uringsend
from helpers import MODES, Receiver, reset, sha, tcp_pair, unix_pair

STABLE = ["zerocopy", "mmap", "copy"]


def send_and_receive(ring, pair, path, mode, offset=0, count=None, header=b""):
    client, peer = pair
    rx = Receiver(peer)
    t = ring.sendfile(client, path, offset, count, mode=mode, header=header)
    sent = t.result(60)
    if t.mode != "splice":
        t.released(60)
    client.shutdown(socket.SHUT_WR)
    return t, sent, rx.join()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size,offset", [(0, 0), (1, 0), (4095, 1), (4096, 0), (65537, 4097),
                                         ((1 << 20) + 3, 1), ((8 << 20) + 5, 12345)])
def test_delivers_identical_bytes(mode, size, offset, any_pair, make_file):
    path, data = make_file(size + offset)
    with uringsend.Ring() as ring:
        t, sent, got = send_and_receive(ring, any_pair, path, mode, offset)
        assert sent == size and t.sent == size and not t.short
        assert sha(got) == sha(data[offset:])
        assert ring.statistics().pending_notifs == 0


@pytest.mark.parametrize("mode", MODES)
def test_large_file(mode, make_file, tcp):
    path, data = make_file((64 << 20) + 4097)
    with uringsend.Ring() as ring:
        t, sent, got = send_and_receive(ring, tcp, path, mode, offset=3)
        assert sent == len(data) - 3
        assert sha(got) == sha(data[3:])


@pytest.mark.parametrize("mode", MODES)
def test_header_and_body_are_one_stream(mode, make_file, any_pair):
    path, data = make_file(300_001)
    header = b"HTTP/1.1 200 OK\r\nContent-Length: 300001\r\n\r\n"
    with uringsend.Ring() as ring:
        t, sent, got = send_and_receive(ring, any_pair, path, mode, header=header)
        assert got == header + data
        assert t.header_sent == len(header) and sent == len(data)
        head = [e for e in t.events if e.offset is None]
        assert head[0].kind == "sent" and head[0].nbytes == len(header)


@pytest.mark.parametrize("mode", MODES)
def test_count_past_eof_is_a_short_transfer(mode, make_file, tcp):
    path, data = make_file(10_000)
    with uringsend.Ring() as ring:
        t, sent, got = send_and_receive(ring, tcp, path, mode, offset=100, count=50_000)
        assert sent == 9_900 and t.short and got == data[100:]


@pytest.mark.parametrize("mode", MODES)
def test_count_limits_the_range(mode, make_file, tcp):
    path, data = make_file(1 << 20)
    with uringsend.Ring() as ring:
        t, sent, got = send_and_receive(ring, tcp, path, mode, offset=4097, count=300_000)
        assert sent == 300_000 and not t.short and got == data[4097:4097 + 300_000]


@pytest.mark.parametrize("mode", MODES)
def test_file_truncated_mid_transfer_ends_short(mode, make_file, tmp_path):
    """The file shrinks after sendfile() was called: the transfer ends with what the file still
    has, reported short, and never hangs."""
    path, data = make_file(8 << 20)
    client, peer = tcp_pair(rcvbuf=65536)
    with client, peer, uringsend.Ring(chunk_size=65536, copy_chunk_size=65536) as ring:
        t = ring.sendfile(client, path, mode=mode)
        os.truncate(path, 1 << 20)
        rx = Receiver(peer)
        try:
            sent = t.result(60)
        except OSError as exc:  # mmap mode may see the pages vanish under a send: EFAULT is named
            pytest.fail(f"truncation raised {exc!r}")
        ring.run_until_complete(60)
        client.shutdown(socket.SHUT_WR)
        got = rx.join()
        assert len(got) == sent and sent >= 0
        assert got == data[:sent]
        assert sent <= 8 << 20
        if sent < 8 << 20:
            assert t.short


@pytest.mark.parametrize("mode", MODES)
def test_empty_file(mode, make_file, tcp):
    path, _ = make_file(0)
    with uringsend.Ring() as ring:
        t, sent, got = send_and_receive(ring, tcp, path, mode)
        assert sent == 0 and got == b"" and t.settled()


def test_many_concurrent_transfers_on_one_ring(make_file):
    """200 transfers to 200 sockets in flight at once; one thread reads all peers."""
    path, data = make_file(65536 + 17)
    pairs = [tcp_pair() if i % 2 else unix_pair() for i in range(200)]
    got = {p.fileno(): bytearray() for _, p in pairs}
    sel = selectors.DefaultSelector()
    for _, p in pairs:
        p.setblocking(False)
        sel.register(p, selectors.EVENT_READ)
    try:
        with uringsend.Ring(buffers=16) as ring:
            modes = ["zerocopy", "mmap", "copy", "splice"]
            ts = [ring.sendfile(c, path, mode=modes[i % 4]) for i, (c, _) in enumerate(pairs)]
            open_peers = len(pairs)
            while open_peers:
                ring.poll(0)
                for key, _ in sel.select(timeout=0.05):
                    chunk = key.fileobj.recv(1 << 20)
                    if chunk:
                        got[key.fileobj.fileno()] += chunk
                    if len(got[key.fileobj.fileno()]) == len(data):
                        sel.unregister(key.fileobj)
                        open_peers -= 1
            ring.run_until_complete(60)
            assert all(t.settled() and t.error is None and t.sent == len(data) for t in ts)
            stats = ring.statistics()
            assert stats.buffers_free == stats.buffers_total == 16
            assert stats.pending_notifs == 0 and stats.transfers_active == 0
        assert all(bytes(b) == data for b in got.values())
    finally:
        sel.close()
        for c, p in pairs:
            c.close()
            p.close()


def test_splice_mode_sends_what_the_file_holds_when_the_peer_reads(make_file, tcp):
    """splice is a mapping: after wait() the bytes are only queued; writing the file now changes
    what the peer receives (kernel fact 10)."""
    path, data = make_file(65536)
    client, peer = tcp
    with uringsend.Ring() as ring:
        t = ring.sendfile(client, path, mode="splice")
        assert t.result(10) == 65536
        assert {e.kind for e in t.events} == {"queued"}
        with pytest.raises(uringsend.ReleaseNotReported):
            t.released(1)
        new = bytes(b ^ 0xFF for b in data)
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, new, 0)
        os.close(fd)
        client.shutdown(socket.SHUT_WR)
        got = Receiver(peer).join()
    changed = sum(1 for a, b in zip(got, data) if a != b)
    assert changed > 0, "expected the peer to see bytes written after the send returned"


@pytest.mark.parametrize("mode", ["zerocopy", "copy"])
def test_stable_modes_send_a_snapshot(mode, make_file, tcp):
    path, data = make_file(65536)
    client, peer = tcp
    with uringsend.Ring() as ring:
        t = ring.sendfile(client, path, mode=mode)
        t.released(10)
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, bytes(b ^ 0xFF for b in data), 0)
        os.close(fd)
        client.shutdown(socket.SHUT_WR)
        assert Receiver(peer).join() == data


def test_mmap_releases_only_after_the_slow_peer_reads(make_file):
    """With a small receive buffer and a peer that has not read, the kernel still references the
    pages: no 'released' may be reported until the peer consumes the data."""
    path, data = make_file(4 << 20)
    client, peer = tcp_pair(rcvbuf=8192)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    with client, peer, uringsend.Ring(chunk_size=1 << 20) as ring:
        t = ring.sendfile(client, path, mode="mmap")
        for _ in range(5):
            ring.poll(0.05)  # give the kernel every chance to (wrongly) report a release
        assert not [e for e in t.events if e.kind == "released"]
        assert not t.done()
        rx = Receiver(peer)
        rx.first_byte.wait(10)
        first_read_ns = time.perf_counter_ns()
        t.released(30)
        released = [e for e in t.events if e.kind == "released"]
        assert sum(e.nbytes for e in released) == len(data)
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data
        assert min(e.t_ns for e in released) >= first_read_ns - 50_000_000


def test_on_release_called_per_chunk_and_errors_raised_from_wait(make_file, tcp):
    path, data = make_file(1 << 20)
    client, peer = tcp
    seen = []
    with uringsend.Ring(chunk_size=256 << 10) as ring:
        rx = Receiver(peer)
        t = ring.sendfile(client, path, mode="mmap", on_release=seen.append)
        t.released(10)
        assert sum(e.nbytes for e in seen) == len(data) and len(seen) == 4
        t2 = ring.sendfile(client, path, mode="copy", on_release=lambda e: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            t2.released(10)
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data + data


def test_blocking_sendfile_convenience(make_file, tcp):
    path, data = make_file(500_000)
    client, peer = tcp
    rx = Receiver(peer)
    with open(path, "rb") as f:
        assert uringsend.sendfile(client, f, mode="mmap") == len(data)
        assert f.tell() == len(data)  # as socket.sendfile leaves it
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data


def test_cancel_in_flight_transfer(make_file):
    path, data = make_file(16 << 20)
    client, peer = tcp_pair(rcvbuf=8192)
    with client, peer:
        for mode in MODES:
            with uringsend.Ring() as ring:
                t = ring.sendfile(client, path, mode=mode)
                ring.poll(0.05)
                t.cancel()
                with pytest.raises(uringsend.TransferCancelled) as exc:
                    t.result(10)
                assert exc.value.errno == errno.ECANCELED
                ring.run_until_complete(10) if mode == "splice" else None
                if mode in STABLE:
                    # peer never read: buffers may stay held until released; the ring keeps them
                    assert t.sent < len(data)
            # drain what the peer got so the next mode starts clean
            peer.setblocking(False)
            try:
                while peer.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
            peer.setblocking(True)


@pytest.mark.parametrize("bad,exc_type,err", [
    (dict(offset=-1), ValueError, None), (dict(count=-5), ValueError, None),
    (dict(offset=10**9), ValueError, None), (dict(mode="fast"), ValueError, None),
    (dict(header="text"), TypeError, None), (dict(offset=1.5), TypeError, None),
])
def test_bad_arguments_raise_before_anything_is_submitted(bad, exc_type, err, make_file, tcp):
    path, _ = make_file(1000)
    with uringsend.Ring() as ring:
        with pytest.raises(exc_type):
            ring.sendfile(tcp[0], path, **bad)
        assert ring.statistics().completions == 0 and len(ring.ledger) == 0


def test_bad_targets(make_file, tmp_path, tcp):
    path, _ = make_file(1000)
    with uringsend.Ring() as ring:
        with pytest.raises(IsADirectoryError):
            ring.sendfile(tcp[0], tmp_path)
        with open(path, "rb") as f:
            with pytest.raises(OSError) as exc:
                ring.sendfile(f.fileno(), path)
            assert exc.value.errno == errno.ENOTSOCK
        with pytest.raises(FileNotFoundError):
            ring.sendfile(tcp[0], tmp_path / "missing")
        with pytest.raises(TypeError):
            ring.sendfile("sock", path)


@pytest.mark.parametrize("mode", MODES)
def test_peer_reset_mid_transfer(mode, make_file):
    path, _ = make_file(16 << 20)
    client, peer = tcp_pair(rcvbuf=8192)
    with client:
        with uringsend.Ring() as ring:
            t = ring.sendfile(client, path, mode=mode)
            ring.poll(0.05)
            reset(peer)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                t.result(10)
            ring.run_until_complete(10)
            stats = ring.statistics()
            assert stats.pending_notifs == 0 and stats.buffers_free == stats.buffers_total


def test_tee_to_many_sockets(make_file):
    path, data = make_file(3_000_001)
    pairs = [tcp_pair() for _ in range(3)] + [unix_pair()]
    rx = [Receiver(p) for _, p in pairs]
    try:
        with uringsend.Ring() as ring:
            ts = ring.tee([c for c, _ in pairs], path, offset=5)
            ring.wait(ts, 30)
            assert [t.sent for t in ts] == [len(data) - 5] * 4
            ring.run_until_complete(10)
        for c, _ in pairs:
            c.shutdown(socket.SHUT_WR)
        assert all(r.join() == data[5:] for r in rx)
    finally:
        for c, p in pairs:
            c.close()
            p.close()


def test_tee_cancelling_one_socket_leaves_the_others_whole(make_file):
    """A cancelled destination drops out alone: it ends with TransferCancelled and its peer has
    exactly ``sent`` bytes of the file; the other sockets get the whole file."""
    path, data = make_file(16 << 20)
    pairs = [tcp_pair() for _ in range(3)]
    gate = threading.Event()
    rx = [Receiver(p, gate=gate if i == 1 else None) for i, (_, p) in enumerate(pairs)]
    try:
        with uringsend.Ring() as ring:
            ts = ring.tee([c for c, _ in pairs], path)
            ring.poll(0.01)
            ts[1].cancel()
            ring.wait(ts, 30)
            gate.set()
            with pytest.raises(uringsend.TransferCancelled):
                ts[1].result(0)
            assert ts[1].sent < len(data)
            assert [ts[0].result(0), ts[2].result(0)] == [len(data)] * 2
            ring.run_until_complete(10)
            assert ring.statistics().transfers_active == 0
        for i, (c, _) in enumerate(pairs):
            c.shutdown(socket.SHUT_WR)
        got = [r.join() for r in rx]
        assert got[0] == got[2] == data
        assert got[1] == data[:ts[1].sent]
    finally:
        for c, p in pairs:
            c.close()
            p.close()


def test_tee_count_and_a_file_that_ends_early(make_file):
    """count past the end: every socket gets the file to its end, exactly, and the transfers
    are short; the caller's fds can be closed right after tee() returns."""
    path, data = make_file(1_000_003)
    pairs = [tcp_pair() for _ in range(2)]
    rx = [Receiver(p) for _, p in pairs]
    try:
        with uringsend.Ring() as ring:
            fd = os.open(path, os.O_RDONLY)
            ts = ring.tee([c.fileno() for c, _ in pairs], fd, offset=3, count=10 << 20)
            os.close(fd)
            ring.wait(ts, 30)
            assert [t.sent for t in ts] == [len(data) - 3] * 2
            assert all(t.short and t.count == 10 << 20 for t in ts)
            assert all(e.kind == "queued" for t in ts for e in t.events)
            ring.run_until_complete(10)
        for c, _ in pairs:
            c.shutdown(socket.SHUT_WR)
        assert [r.join() for r in rx] == [data[3:]] * 2
    finally:
        for c, p in pairs:
            c.close()
            p.close()


def test_tee_survives_one_peer_resetting(make_file):
    path, data = make_file(8 << 20)
    pairs = [tcp_pair() for _ in range(3)]
    victim = pairs[1][1]
    rx = [Receiver(p) if i != 1 else None for i, (_, p) in enumerate(pairs)]
    try:
        with uringsend.Ring() as ring:
            ts = ring.tee([c for c, _ in pairs], path)
            ring.poll(0.01)
            reset(victim)
            ring.wait(ts, 30)
            assert isinstance(ts[1].error, (ConnectionResetError, BrokenPipeError)) or ts[1].sent == len(data)
            for i in (0, 2):
                assert ts[i].error is None and ts[i].sent == len(data)
            ring.run_until_complete(10)
        for i in (0, 2):
            pairs[i][0].shutdown(socket.SHUT_WR)
            assert rx[i].join() == data
    finally:
        for c, p in pairs:
            c.close()
            p.close()


def test_mapping_is_made_once_per_file(make_file, tcp):
    path, data = make_file(100_000)
    client, peer = tcp
    rx = Receiver(peer)
    with uringsend.Ring() as ring:
        for mode in ("copy", "mmap", "copy"):
            ring.sendfile(client, path, mode=mode).released(10)
        assert ring.statistics().mappings_created == 1
        with open(path, "ab") as f:  # the file grows: a new mapping, never a stale one
            f.write(b"tail")
        ring.sendfile(client, path, mode="copy").released(10)
        assert ring.statistics().mappings_created == 2
        assert ring.statistics().mappings_busy == 0
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data * 3 + data + b"tail"


@pytest.mark.parametrize("mode", MODES)
def test_non_blocking_socket_that_fills(mode, make_file):
    """O_NONBLOCK socket, peer reading late: splice gets literal -EAGAIN CQEs [KF 6] and is
    re-armed with POLL_ADD; sends are poll-retried by the kernel. Data arrives intact."""
    path, data = make_file((4 << 20) + 123)
    client, peer = tcp_pair(rcvbuf=16384)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    client.setblocking(False)
    gate = threading.Event()
    with client, peer, uringsend.Ring(trace=True) as ring:
        rx = Receiver(peer, gate=gate)
        t = ring.sendfile(client, path, mode=mode)
        if mode == "splice":  # the peer is not reading: the socket must fill and say -EAGAIN
            ring.driver.run_until(lambda: any(e.res == -errno.EAGAIN for e in ring.trace()), 10)
        else:
            ring.poll(0.05)
        gate.set()
        assert t.result(30) == len(data)
        ring.run_until_complete(30)
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data
        if mode == "splice":
            eagain = [e for e in ring.trace() if e.transfer is t and e.res == -errno.EAGAIN]
            polls = [e for e in ring.trace() if e.transfer is t and e.role == "poll"]
            assert eagain and polls, "expected -EAGAIN splices re-armed by POLL_ADD"


@pytest.mark.parametrize("mode", ["copy", "mmap"])
def test_large_file_rss_stays_bounded(mode, make_file, tcp):
    """Pages of a large file's mapping are dropped from the page tables as they are released, so
    RSS follows what is in flight, not the file size."""
    import hashlib
    import psutil
    path, data = make_file(96 << 20)
    client, peer = tcp
    digest = hashlib.sha256()

    def drain():
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            n = peer.recv_into(buf)
            if not n:
                return
            digest.update(view[:n])

    reader = threading.Thread(target=drain)
    reader.start()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    with uringsend.Ring() as ring:
        t = ring.sendfile(client, path, mode=mode,
                          on_release=lambda e: peak.append(proc.memory_info().rss))
        t.released(60)
    client.shutdown(socket.SHUT_WR)
    reader.join(60)
    assert digest.hexdigest() == sha(data)
    assert (max(peak) - base) <= 24 << 20, f"RSS grew {(max(peak) - base) >> 20} MiB"


def test_a_small_transfer_costs_one_enter_and_no_fd(make_file, tcp):
    """A 4 KiB copy transfer to a socket with room: its FILES_UPDATE, SEND and the FILES_UPDATE
    that empties the slot go in one submission and complete inside sendfile(), so waiting costs no
    further io_uring_enter; no fd is duplicated per transfer (the file's mapping, made by the first
    one and cached, holds the only descriptor the ring adds)."""
    path, data = make_file(4096)
    client, peer = tcp
    with open(path, "rb") as f, uringsend.Ring() as ring:
        rx = Receiver(peer)
        assert ring.sendfile(client, f, mode="copy").released(5) == len(data)
        fds = len(os.listdir("/proc/self/fd"))
        before = ring.statistics()
        for _ in range(50):
            t = ring.sendfile(client, f, mode="copy")
            assert t.done() and t.settled()  # completed inside sendfile()
            assert t.released(0) == len(data)
        after = ring.statistics()
        assert after.enters - before.enters == 50
        assert after.fds_duplicated == 0 and after.fixed_files > 0
        assert len(os.listdir("/proc/self/fd")) == fds
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data * 51


def test_the_blocking_one_liner_reuses_a_ring_per_thread(make_file, tcp):
    """uringsend.sendfile() keeps one ring per thread: no ring is set up per call, and the ring
    of a thread that ended is closed (its fd is gone)."""
    path, data = make_file(10_000)
    client, peer = tcp
    rx = Receiver(peer)
    rings = []

    def rings_open():
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]"
            except OSError:
                pass  # listdir's own descriptor, closed by now
        return n

    base = rings_open()
    for _ in range(20):
        assert uringsend.sendfile(client, path) == len(data)
    assert rings_open() == base + 1

    def other_thread():
        rings.append(uringsend.sendfile(client, path))

    th = threading.Thread(target=other_thread)
    th.start()
    th.join()
    assert rings == [len(data)]
    import gc
    gc.collect()
    assert rings_open() == base + 1  # the other thread's ring went with its thread
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data * 21
