"""Ring.stream: a writer on a registered circular buffer, sent with SEND_ZC from the fixed buffer;
a region is handed out again only after the kernel released it."""
import asyncio
import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import threading

import pytest

import uringsend
from uringsend import _lowlevel as ll, aio, stream
from uringsend.stream import AsyncStreamWriter, StreamError
from uringsend.errors import RingOwnerError, TransferCancelled

from _faults import small_buffers
from _semantics import F_MORE, F_NOTIF, PAGE, Recorder, SyscallRing, cqes, submit, wait_released
from helpers import Receiver, reset, sha, tcp_pair, unix_pair

KB, MB = 1 << 10, 1 << 20
BLOCK = os.urandom(MB + 65536)  # records are slices of this at odd offsets and sizes


@pytest.fixture(autouse=True)
def no_pin_left():
    before = set(stream._pinned)
    yield
    assert not (stream._pinned - before), stream._pinned - before


class HashReader:
    """Reads a socket to EOF in a thread, keeping only the sha256 and the length."""

    def __init__(self, sock, gate=None):
        self.sock, self.gate = sock, gate
        self.hash, self.n, self.error = hashlib.sha256(), 0, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            if self.gate is not None:
                self.gate.wait()
            while chunk := self.sock.recv(1 << 20):
                self.hash.update(chunk)
                self.n += len(chunk)
        except OSError as exc:
            self.error = exc

    def join(self, timeout=120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "reader did not see EOF"
        return self.n, self.hash.hexdigest()


def records(total, seed, largest=20000):
    """Odd-sized records adding up to ``total`` bytes."""
    rng = random.Random(seed)
    left = total
    while left:
        n = min(left, rng.randint(1, largest))
        at = rng.randint(0, len(BLOCK) - n)
        yield memoryview(BLOCK)[at:at + n]
        left -= n


@pytest.mark.parametrize("mode", ["zerocopy", "copy"])
@pytest.mark.parametrize("total", [0, 1, 4095, 3 * 64 * KB + 17, 16 * MB + 3])
def test_every_byte_in_order_across_wrap_around(total, mode):
    client, peer = tcp_pair()
    rx = HashReader(peer)
    expect = hashlib.sha256()
    try:
        with uringsend.Ring() as ring:
            with ring.stream(client, 64 * KB, mode=mode) as w:
                for rec in records(total, seed=total):
                    assert w.write(rec) == len(rec)
                    expect.update(rec)
                assert w.committed == total
            st = w.statistics()
            assert st["released"] == st["sent"] == total and st["in_flight"] == 0
            assert st["wrapped"] == total // (64 * KB)
            assert st["copied"] == total  # loopback: the kernel copies, and says so [KF 15]
            assert w.transfer.settled() and not w.transfer.pinned
            assert ring.statistics().transfers_active == 0
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == (total, expect.hexdigest())
    finally:
        client.close()
        peer.close()


def test_256_mib_through_a_1_mib_buffer():
    total = 256 * MB
    client, peer = tcp_pair()
    rx = HashReader(peer)
    expect = hashlib.sha256()
    try:
        with uringsend.Ring() as ring, ring.stream(client, MB) as w:
            for rec in records(total, seed=7, largest=300000):
                w.write(rec)
                expect.update(rec)
            w.flush()
            assert w.released == total and w.wrapped == 256
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == (total, expect.hexdigest())
    finally:
        client.close()
        peer.close()


def test_reserve_and_commit_fill_in_place_and_the_view_ends_at_commit(tcp):
    client, peer = tcp
    rx = Receiver(peer)
    sent = bytearray()
    with uringsend.Ring() as ring, ring.stream(client, 16 * KB) as w:
        for i in range(50):
            view = w.reserve(3000)
            n = len(view)
            assert 1 <= n <= 3000  # shorter only at the end of the buffer
            view[:] = bytes([i % 256]) * n
            w.commit(n - 1)  # commit may take less than was reserved
            with pytest.raises(ValueError):
                view[0] = 1  # released at commit: it cannot change what was sent
            sent += bytes([i % 256]) * (n - 1)
        view = w.reserve(10)
        w.commit(0)
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == sent


def test_a_stalled_reader_blocks_the_writer_and_nothing_is_reused_or_lost():
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    gate = threading.Event()
    rx = HashReader(peer, gate)
    expect = hashlib.sha256()
    size = 64 * KB  # drained through tiny socket buffers afterwards: keep it small
    try:
        with uringsend.Ring() as ring, ring.stream(client, size) as w:
            written = 0
            with pytest.raises(TimeoutError):
                for rec in records(4 * MB, seed=3, largest=5000):
                    w.write(rec, timeout=0.2)  # the wait that fails: the peer reads nothing
                    expect.update(rec)
                    written += len(rec)
            # The writer stopped with its buffer full of unreleased bytes: nothing was handed out
            # again before the kernel released it, whatever the buffer size would suggest.
            st = w.statistics()
            assert st["committed"] - st["released"] > size - 5000
            assert st["committed"] - st["released"] <= size
            assert st["released"] < st["committed"] and st["waits"] >= 1
            # the failed write committed what fitted before it waited: account for it
            tail = st["committed"] - written
            assert 0 <= tail < 5000
            expect.update(bytes(rec[:tail]))
            gate.set()
            rest = b"after the stall"
            w.write(rest)
            expect.update(rest)
            w.flush()
            assert w.released == w.committed
        client.shutdown(socket.SHUT_WR)
        n, digest = rx.join()
        assert n == st["committed"] + len(rest) and digest == expect.hexdigest()
    finally:
        gate.set()
        client.close()
        peer.close()


def test_reusing_a_released_region_never_changes_what_the_peer_got(tcp):
    client, peer = tcp
    rx = Receiver(peer)
    first, second = os.urandom(64 * KB), os.urandom(64 * KB)
    with uringsend.Ring() as ring, ring.stream(client, 64 * KB) as w:
        w.write(first)
        w.flush()  # released: the whole buffer may be reused
        view = w.reserve(64 * KB)
        assert len(view) == 64 * KB  # the same region, handed out again
        view[:] = second
        w.commit(len(view))
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == first + second


@pytest.mark.parametrize("mode", ["zerocopy", "copy"])
def test_peer_reset_mid_stream_is_a_clear_error_and_nothing_is_reused_early(mode):
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    try:
        with uringsend.Ring() as ring:
            w = ring.stream(client, 256 * KB, mode=mode)
            w.write(BLOCK[:256 * KB])
            reset(peer)  # unread data: an RST
            with pytest.raises((ConnectionResetError, BrokenPipeError)) as info:
                for _ in range(100):
                    w.write(BLOCK[:64 * KB], timeout=10)
                w.flush(10)
            assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
            assert f"fd {client.fileno()}" in str(info.value)
            assert w.committed - w.released <= w.size
            with pytest.raises(type(info.value)):
                w.close()
            assert w.closed and w.transfer.settled() and not w.transfer.pinned
            with pytest.raises(StreamError):
                w.write(b"x")
    finally:
        client.close()


def test_unix_stream_falls_back_to_copying_sends():
    client, peer = unix_pair()
    rx = Receiver(peer)
    try:
        with uringsend.Ring() as ring, ring.stream(client, 64 * KB) as w:
            w.write(BLOCK[:MB])
        assert w.transfer.fallback and w.statistics()["copied"] == MB
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == BLOCK[:MB]
    finally:
        client.close()
        peer.close()


@pytest.mark.parametrize("pool_first", [True, False])
def test_stream_buffers_and_the_zerocopy_pool_share_the_buffer_table(pool_first, make_file):
    path, data = make_file(3 * MB + 5)
    client, peer = tcp_pair()
    client2, peer2 = tcp_pair()
    rx, rx2 = Receiver(peer), Receiver(peer2)
    try:
        with uringsend.Ring(buffers=4, buffer_size=64 * KB) as ring:
            if pool_first:
                ring.sendfile(client2, path, mode="zerocopy").released(10)
            with ring.stream(client, 64 * KB) as w:
                w.write(BLOCK[:MB])
                if not pool_first:
                    ring.sendfile(client2, path, mode="zerocopy").released(10)
                w.write(BLOCK[MB:2 * MB])
        for c in (client, client2):
            c.shutdown(socket.SHUT_WR)
        assert rx.join() == BLOCK[:2 * MB]
        assert sha(rx2.join()) == sha(data)
    finally:
        for s in (client, peer, client2, peer2):
            s.close()


def test_stream_slots_are_limited_and_given_back(tcp):
    client, _ = tcp
    with uringsend.Ring() as ring:
        writers = [ring.stream(client, 4096) for _ in range(64)]
        with pytest.raises(OSError) as info:
            ring.stream(client, 4096)
        assert info.value.errno == errno.ENOSPC and "slots" in str(info.value)
        writers.pop().close()
        writers.append(ring.stream(client, 4096))
        for w in writers:
            w.close()
        assert ring.statistics().transfers_active == 0


def test_closing_the_ring_ends_an_open_stream(tcp):
    client, peer = tcp
    rx = Receiver(peer)
    ring = uringsend.Ring()
    w = ring.stream(client, 64 * KB)
    w.write(b"before close")
    w.flush()
    ring.close()
    with pytest.raises((TransferCancelled, ValueError)):
        w.write(b"after")
    w.close()  # nothing left to do, and no error of its own
    assert w.closed and w.transfer.settled() and not w.transfer.pinned
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"before close"


def test_bad_arguments_are_refused(tcp, tmp_path):
    client, _ = tcp
    with uringsend.Ring() as ring:
        for size in (0, 4095, 4097, 1 << 31, "1"):
            with pytest.raises(ValueError, match="size"):
                ring.stream(client, size)
        with pytest.raises(ValueError, match="mode"):
            ring.stream(client, 4096, mode="splice")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            with pytest.raises(ValueError, match="SOCK_DGRAM"):
                ring.stream(udp, 4096)
        with ring.stream(client, 4096) as w:
            for n in (0, 4097, 1.5):
                with pytest.raises(ValueError, match="reserve"):
                    w.reserve(n)
            with pytest.raises(ValueError, match="without a reserved view"):
                w.commit(1)
            assert len(w.reserve(10)) == 10
            with pytest.raises(ValueError, match="commit"):
                w.commit(11)
            w.commit(0)
            with pytest.raises(TypeError, match="not str"):
                w.write("text")
            with pytest.raises(ValueError, match="C-contiguous"):
                w.write(memoryview(bytes(10))[::2])
        with pytest.raises(StreamError):
            w.write(b"x")
        assert ring.statistics().transfers_active == 0


def test_async_writer_writes_drains_and_closes():
    async def main():
        client, peer = tcp_pair(rcvbuf=4096)
        small_buffers(client)
        gate = threading.Event()
        rx = HashReader(peer, gate)
        expect = hashlib.sha256()
        try:
            async with aio.AsyncRing(64) as aring:
                w = AsyncStreamWriter(aring, client, 64 * KB)
                ticks = 0

                async def ticker():  # the loop keeps running while the writer waits
                    nonlocal ticks
                    while True:
                        ticks += 1
                        if ticks == 3:
                            gate.set()  # the reader starts only once the loop has turned
                        await asyncio.sleep(0)
                task = asyncio.ensure_future(ticker())
                for rec in records(4 * MB, seed=11):
                    await w.write(rec)
                    expect.update(rec)
                await w.drain()
                assert w.released == w.committed == 4 * MB and w.waits == 0
                await w.aclose()
                task.cancel()
                assert ticks >= 3 and w.transfer.settled()
            client.shutdown(socket.SHUT_WR)
            assert rx.join() == (4 * MB, expect.hexdigest())
        finally:
            gate.set()
            client.close()
            peer.close()
    asyncio.run(main())


def _demo(*args):
    proc = subprocess.run([sys.executable, "-m", "uringsend", "demo", "stream", "--json", *args],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_demo_stream_runs_and_passes_its_checks():
    doc = _demo()
    assert doc["ok"] and doc["demo"] == "stream"
    assert all(c["ok"] for c in doc["checks"])
    normal, tiny = doc["runs"]
    assert normal["waits"] == 0 or normal["size"] > tiny["size"]
    assert tiny["waits"] > 0  # the tiny buffer made the writer wait for releases
    assert tiny["lines"] and all(line["in_flight"] <= tiny["size"] for line in tiny["lines"])


# ---- kernel fact 29: one buffer registration per ring; a sparse table's slots are updated any time --
_REGISTER_BUFFERS, _REGISTER_BUFFERS2, _REGISTER_BUFFERS_UPDATE = 0, 15, 16
_RSRC_REGISTER_SPARSE = 1


def _register(ring, opcode, arg, nr):
    libc = SyscallRing._libc
    ret = libc.syscall(427, ring.fd, opcode, ctypes.c_void_p(arg), nr)  # io_uring_register
    return ret if ret >= 0 else -ctypes.get_errno()


def _iovecs(*buffers):
    vec = (ctypes.c_uint64 * (2 * len(buffers)))()
    for i, buf in enumerate(buffers):
        vec[2 * i] = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        vec[2 * i + 1] = len(buf)
    return vec


def test_buffers_register_once_but_a_sparse_tables_slots_update_any_time():
    a, b = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
    vec = _iovecs(a, b)
    with SyscallRing(8) as plain, SyscallRing(8) as sparse:
        assert _register(plain, _REGISTER_BUFFERS, ctypes.addressof(vec), 1) == 0
        assert _register(plain, _REGISTER_BUFFERS, ctypes.addressof(vec), 1) == -errno.EBUSY
        table = struct.pack("IIQQQ", 4, _RSRC_REGISTER_SPARSE, 0, 0, 0)  # io_uring_rsrc_register
        tbuf = ctypes.create_string_buffer(table, len(table))
        assert _register(sparse, _REGISTER_BUFFERS2, ctypes.addressof(tbuf), len(table)) == 0
        for slot, at in ((3, 0), (0, 1)):  # any slot, in any order, one registration each
            update = struct.pack("IIQQII", slot, 0, ctypes.addressof(vec) + 16 * at, 0, 1, 0)
            ubuf = ctypes.create_string_buffer(update, len(update))
            assert _register(sparse, _REGISTER_BUFFERS_UPDATE, ctypes.addressof(ubuf), len(update)) == 1
        assert _register(sparse, _REGISTER_BUFFERS, ctypes.addressof(vec), 1) == -errno.EBUSY
    del vec
    a.close()
    b.close()


def test_an_emptied_stream_slot_is_efault_for_a_fixed_send(tcp):
    client, peer = tcp
    rec = Recorder()
    rx = Receiver(peer)
    with uringsend.Ring(entries=8, buffers=2, buffer_size=PAGE, trace=True) as ring:
        ring._register_pool()  # the pool takes slots 0 and 1 of a sparse table of 2 + 64
        with ring.stream(client, PAGE) as w:  # the first stream slot, 2, filled by an update
            w.write(b"s" * 10)
        # closed: slot 2 is empty again, and a fixed send naming it fails
        empty = rec.op(ll.OP_SEND_ZC_FIXED, client.fileno(), addr=ring._core.pool_address(0), len=10,
                       buf_index=2, op_flags=socket.MSG_NOSIGNAL)
        submit(ring, [empty])
        wait_released(ring, rec, empty)
        assert cqes(ring, empty) == [(-errno.EFAULT, F_MORE), (0, F_NOTIF)]
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"s" * 10


def test_a_writer_is_used_only_from_its_rings_thread(tcp):
    client, peer = tcp
    rx = Receiver(peer)
    caught = []
    with uringsend.Ring() as ring, ring.stream(client, 4096) as w:
        th = threading.Thread(target=lambda: caught.append(pytest.raises(RingOwnerError, w.write, b"x")))
        th.start()
        th.join()
        w.write(b"ok")
    assert caught and w.statistics()["committed"] == 2
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"ok"


def test_ring_closed_with_notifications_pending_keeps_the_buffer():
    client, peer = tcp_pair(rcvbuf=4096)  # a tiny window; the sender's buffer queues what cannot leave
    try:
        ring = uringsend.Ring(close_timeout=0.3)
        w = ring.stream(client, MB)
        w.write(BLOCK[:MB])
        ring.poll(0)
        with pytest.warns(ResourceWarning):
            ring.close()
        assert ring.statistics().kept_alive > 0
        assert not w.transfer.settled() and w.transfer.pinned and w.transfer in stream._pinned
        with pytest.raises((TransferCancelled, ValueError)):
            w.write(b"x")
        w.close()  # nothing to drive any more; the buffer stays with the kernel's references
        assert w.closed and w.transfer.pinned
    finally:
        client.close()
        peer.close()
    stream._pinned.clear()  # this test's pin is meant to stay; let the fixture check the others


@pytest.mark.parametrize("mode", ["zerocopy", "copy"])
def test_one_write_ten_times_the_buffer(tcp, mode):
    client, peer = tcp
    rx = Receiver(peer)
    data = BLOCK[:10 * 64 * KB + 5]
    with uringsend.Ring() as ring, ring.stream(client, 64 * KB, mode=mode) as w:
        assert w.write(data) == len(data)
        w.flush()
        assert w.wrapped == 10 and w.released == len(data)
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data


def test_auto_writer_sends_with_send_once_the_kernel_reports_copies(tcp):
    client, peer = tcp
    rx = HashReader(peer)
    size = 256 * KB  # sends of at most size / 8
    total = 16 * MB
    with uringsend.Ring() as ring, ring.stream(client, size, mode="auto") as w:
        for rec in records(total, seed=5, largest=60000):
            w.write(rec)
        w.flush()
        notifs = ring.statistics().notifs
        # loopback copies SEND_ZC data [KF 15]: after 8 notifications saying so, copying sends
        assert "copied" in w.transfer.fallback
        assert 8 <= notifs < total // (size // 8) // 4
        assert w.statistics()["copied"] == total and w.statistics()["zerocopy"] == 0
    client.shutdown(socket.SHUT_WR)
    expect = hashlib.sha256()
    for rec in records(total, seed=5, largest=60000):
        expect.update(rec)
    assert rx.join() == (total, expect.hexdigest())


# ---- randomized sessions: writes, reserves, partial commits, flushes, resets ------------------------
class PrefixReader:
    """Reads to EOF in pieces of random size; with ``reset_after``, closes with an RST (unread data
    left) once it has read that many bytes."""

    def __init__(self, sock, rng, reset_after=None):
        self.sock, self.rng, self.reset_after = sock, rng, reset_after
        self.data = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while chunk := self.sock.recv(self.rng.choice((1, 100, 4096, 65536, 1 << 20))):
                self.data += chunk
                if self.reset_after is not None and len(self.data) >= self.reset_after:
                    reset(self.sock)
                    return
        except OSError:
            pass

    def join(self):
        self.thread.join(60)
        assert not self.thread.is_alive()
        return bytes(self.data)


def _check_invariants(w):
    assert 0 <= w.released <= w.sent <= w.committed
    assert w.committed - w.released <= w.size  # nothing handed out before its release


@pytest.mark.parametrize("seed", range(24))
def test_randomized_writer_sessions(seed):
    rng = random.Random(seed)
    mode = rng.choice(["zerocopy", "copy", "auto"])
    size = rng.choice([4096, 8192, 65536, 262144])
    total = rng.randint(0, 3 * MB)
    reset_after = rng.randint(0, total) if total and rng.random() < 0.3 else None
    client, peer = tcp_pair()
    rx = PrefixReader(peer, random.Random(seed + 1000), reset_after)
    expect = bytearray()
    pending = b""
    try:
        with uringsend.Ring() as ring:
            w = ring.stream(client, size, mode=mode)
            try:
                while len(expect) < total:
                    step = rng.random()
                    n = rng.randint(1, min(2 * size, total - len(expect)))
                    at = rng.randint(0, len(BLOCK) - n)
                    if step < 0.5:
                        pending = BLOCK[at:at + n]  # write() may commit part of it, then fail
                        w.write(pending, timeout=30)
                        expect += pending
                        pending = b""
                    elif step < 0.85:
                        view = w.reserve(min(n, size), timeout=30)
                        k = rng.randint(0, len(view))
                        view[:] = BLOCK[at:at + len(view)]
                        w.commit(k)
                        expect += BLOCK[at:at + k]
                    elif step < 0.95:
                        w.flush(30)
                        assert w.released == w.committed
                    else:
                        ring.poll(0)
                    _check_invariants(w)
                w.close(30)
            except (ConnectionResetError, BrokenPipeError) as exc:
                assert reset_after is not None, exc
                expect += pending[:w.committed - len(expect)]
                if not w.closed:  # close() raises the stream's error too (once: then it is closed)
                    with pytest.raises(type(exc)):
                        w.close(30)
                w.close()
            _check_invariants(w)
            assert w.committed == len(expect)
            assert w.closed and w.transfer.settled() and not w.transfer.pinned
            assert ring.statistics().transfers_active == 0
        if reset_after is None:
            client.shutdown(socket.SHUT_WR)
        got = rx.join()  # with a reset, the writer may have finished before it reached the socket
        if reset_after is None:
            assert got == expect
        else:
            assert got == expect[:len(got)]  # a prefix, in order, with nothing overwritten
    finally:
        client.close()
        peer.close()


def test_commit_of_a_view_something_still_exports(tcp):
    client, peer = tcp
    rx = Receiver(peer)
    with uringsend.Ring() as ring, ring.stream(client, 4096) as w:
        view = w.reserve(5)
        inner = memoryview(view)  # an export of the view: it cannot be released at commit
        inner[:] = b"hello"
        w.commit(5)
        w.flush()
        inner.release()
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"hello"
