"""Ring.send: any contiguous bytes-like object to a stream socket, as a memory source of the engine's
chains (SEND_ZC or SEND per chunk), its buffer pinned until the transfer settles and unpinned once."""
import array
import asyncio
import errno
import mmap
import os
import select
import socket

import pytest

import uringsend
from uringsend import aio, stream
from uringsend.errors import TransferCancelled

from helpers import Receiver, reset, sha, tcp_pair, unix_pair

MB = 1 << 20


@pytest.fixture(autouse=True)
def no_pin_left():
    """Every memory transfer a test started is settled and unpinned by its end (rings closed with
    the kernel still holding memory are the tests' explicit exception)."""
    before = set(stream._pinned)
    yield
    assert not (stream._pinned - before), stream._pinned - before


def _tiles(events, kind, n):
    """The events of ``kind`` cover [0, n) exactly once."""
    spans = sorted((e.offset, e.nbytes) for e in events if e.kind == kind)
    at = 0
    for offset, nbytes in spans:
        assert offset == at, spans
        at += nbytes
    assert at == n, spans


def _kinds(size):
    data = os.urandom(size)
    anon = mmap.mmap(-1, max(size, 1))
    anon[:size] = data
    return {
        "bytes": (data, data),
        "bytearray": (bytearray(data), data),
        "memoryview-slice": (memoryview(b"xyz" + data + b"abc")[3:3 + size], data),
        "mmap": (anon, bytes(anon)),
    }


@pytest.mark.parametrize("mode", ["zerocopy", "copy", "auto"])
@pytest.mark.parametrize("size", [0, 1, 4095, 3 * MB + 17])
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview-slice", "mmap"])
def test_every_byte_and_every_chunk_released(kind, size, mode):
    data, expect = _kinds(size)[kind]
    client, peer = tcp_pair()
    rx = Receiver(peer)
    try:
        with uringsend.Ring(chunk_size=MB, copy_chunk_size=MB) as ring:
            released = []
            t = ring.send(client, data, mode=mode, on_release=released.append)
            assert t.mode == ("copy" if mode == "auto" else mode)
            assert t.released(30) == len(expect)
            assert t.settled() and t.error is None and not t.pinned
            assert t.sent == t.count == len(expect) and t.released_upto == len(expect)
            _tiles(t.events, "sent", len(expect))
            _tiles(t.events, "released", len(expect))
            assert released == [e for e in t.events if e.kind == "released"]
            # loopback: the kernel copies SEND_ZC data, and says so [KF 15]
            assert all(e.copied is True for e in released)
            client.shutdown(socket.SHUT_WR)
            assert sha(rx.join()) == sha(expect)
    finally:
        client.close()
        peer.close()
        if kind == "mmap":
            data.close()  # closable again: the pin is gone


def test_array_of_ints_is_sent_as_its_bytes(tcp):
    client, peer = tcp
    data = array.array("i", range(100000))
    rx = Receiver(peer)
    with uringsend.Ring() as ring:
        assert ring.send(client, data, mode="zerocopy").released(10) == len(data) * data.itemsize
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data.tobytes()


def test_unix_socket_falls_back_to_copying_sends():
    client, peer = unix_pair()
    data = os.urandom(2 * MB)
    rx = Receiver(peer)
    try:
        with uringsend.Ring() as ring:
            t = ring.send(client, data, mode="zerocopy")
            assert t.released(10) == len(data)
            assert t.fallback and "EOPNOTSUPP" in t.fallback
            _tiles(t.events, "released", len(data))
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data
    finally:
        client.close()
        peer.close()


def _stalled_pair():
    """A connection whose peer does not read yet and whose buffers are small: a multi-MiB send
    stays in flight until the peer reads."""
    return tcp_pair(rcvbuf=4096, sndbuf=4096)


@pytest.mark.parametrize("mode", ["zerocopy", "copy"])
def test_buffer_is_pinned_until_settled_then_unpinned_once(mode):
    # Peers that read only later, and more than the sockets' buffers hold: the sends stay in flight.
    # (Tiny socket buffers would do it with less, but then every segment waits for a delayed ACK.)
    client, peer = tcp_pair()
    client2, peer2 = tcp_pair()  # transfers on one socket at once would interleave: two sockets
    data = bytearray(os.urandom(32 * MB))
    anon = mmap.mmap(-1, 32 * MB)
    anon.write(data)
    try:
        with uringsend.Ring() as ring:
            t = ring.send(client, data, mode=mode)
            tm = ring.send(client2, anon, mode=mode)
            ring.poll(0)
            assert not t.settled() and t.pinned and tm.pinned
            with pytest.raises(BufferError):
                data.append(0)  # a pinned bytearray cannot be resized
            with pytest.raises(BufferError):
                anon.close()  # nor a pinned mmap closed
            rx, rx2 = Receiver(peer), Receiver(peer2)
            ring.wait([t, tm], 30, released=True)
            assert not t.pinned and not tm.pinned
            expect = bytes(data)
            data.append(0)
            anon.close()
            client.shutdown(socket.SHUT_WR)
            client2.shutdown(socket.SHUT_WR)
            assert rx.join() == expect
            assert rx2.join() == expect
    finally:
        for s in (client, peer, client2, peer2):
            s.close()


def test_mutating_after_release_never_changes_what_the_peer_got(tcp):
    client, peer = tcp
    data = bytearray(os.urandom(2 * MB))
    original = bytes(data)
    rx = Receiver(peer)
    with uringsend.Ring() as ring:
        t = ring.send(client, data, mode="zerocopy")
        t.released(10)
        data[:] = b"\0" * len(data)  # after its release the memory is the caller's again
        assert ring.send(client, b"end", mode="copy").released(10) == 3
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == original + b"end"


@pytest.mark.parametrize("mode", ["zerocopy", "copy"])
def test_peer_reset_mid_send_fails_with_the_errno_and_unpins(mode):
    client, peer = _stalled_pair()
    data = bytearray(8 * MB)
    try:
        with uringsend.Ring(chunk_size=64 << 10, copy_chunk_size=64 << 10) as ring:
            t = ring.send(client, data, mode=mode)
            while not select.select([peer], [], [], 0)[0]:
                ring.poll(1)
            reset(peer)  # unread data: an RST
            t.released(30)  # settles, whatever the outcome
            with pytest.raises((ConnectionResetError, BrokenPipeError)) as info:
                t.result(0)
            assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
            assert "send" in str(info.value) and f"fd {client.fileno()}" in str(info.value)
            assert t.settled() and not t.pinned and t.sent < len(data)
            data.append(0)
    finally:
        client.close()


def test_cancel_stops_the_send_and_unpins(tcp):
    client, peer = _stalled_pair()
    data = bytearray(8 * MB)
    try:
        with uringsend.Ring(chunk_size=64 << 10) as ring:
            t = ring.send(client, data, mode="zerocopy")
            ring.poll(0)
            t.cancel()
            rx = Receiver(peer)  # reading lets the kernel release what it holds
            t.released(30)  # settles, whatever the outcome
            with pytest.raises(TransferCancelled):
                t.result(0)
            assert t.settled() and not t.pinned and t.sent < len(data)
            client.shutdown(socket.SHUT_WR)
            assert len(rx.join()) == t.sent
    finally:
        client.close()
        peer.close()


def test_ring_closed_with_notifications_pending_keeps_the_pin():
    # The peer's window is tiny; the sender's buffer is not, so sends queue skbs there that cannot
    # leave (tiny buffers on both ends would let every queued byte reach the peer and be released).
    client, peer = tcp_pair(rcvbuf=4096)
    data = bytearray(os.urandom(4 * MB))
    try:
        ring = uringsend.Ring(chunk_size=64 << 10, close_timeout=0.3)
        t = ring.send(client, data, mode="zerocopy")
        while not select.select([peer], [], [], 0)[0]:
            ring.poll(1)
        with pytest.warns(ResourceWarning):
            ring.close()
        assert ring.statistics().kept_alive > 0
        assert not t.settled() and t.pinned and t in stream._pinned
        with pytest.raises(BufferError):
            data.append(0)  # never released: the kernel may still read it
        del t
        assert any(isinstance(p, stream.MemoryTransfer) and p._x.sent for p in stream._pinned)
    finally:
        client.close()
        peer.close()
    stream._pinned.clear()  # this test's pin is meant to stay; let the fixture check the others


def _udp():
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


@pytest.mark.parametrize("data, exc, text", [
    ("text", TypeError, "not str"),
    (12, TypeError, "not int"),
    (memoryview(bytes(100))[::2], ValueError, "C-contiguous"),
])
def test_bad_data_is_refused_before_anything_starts(tcp, data, exc, text):
    client, _ = tcp
    with uringsend.Ring() as ring:
        with pytest.raises(exc, match=text):
            ring.send(client, data)
        assert ring.statistics().transfers_started == 0


def test_closed_mmap_and_released_view_are_refused(tcp):
    client, _ = tcp
    anon = mmap.mmap(-1, 4096)
    anon.close()
    view = memoryview(b"abc")
    view.release()
    with uringsend.Ring() as ring:
        with pytest.raises(ValueError, match="mmap closed"):
            ring.send(client, anon)
        with pytest.raises(ValueError, match="released"):
            ring.send(client, view)
        assert ring.statistics().transfers_started == 0


def test_bad_sockets_and_options_are_refused_and_pin_nothing(tcp, tmp_path):
    client, _ = tcp
    data = bytearray(b"x" * 100)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with uringsend.Ring() as ring, _udp() as udp, open(path, "rb") as f:
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            ring.send(udp, data)
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            ring.send(udp.fileno(), data)
        with pytest.raises(OSError) as info:
            ring.send(f.fileno(), data)
        assert info.value.errno == errno.ENOTSOCK
        with pytest.raises(TypeError, match="sock must be"):
            ring.send("localhost", data)
        with pytest.raises(ValueError, match="mode must be"):
            ring.send(client, data, mode="splice")
        with pytest.raises(TypeError, match="on_release"):
            ring.send(client, data, on_release=3)
        closed = socket.socket()
        closed.close()
        with pytest.raises(OSError) as info:
            ring.send(closed, data)
        assert info.value.errno == errno.EBADF
        assert ring.statistics().transfers_started == 0
    data.append(0)  # nothing kept a pin


def test_an_unconnected_socket_fails_as_an_operation_error():
    with uringsend.Ring() as ring, socket.socket() as s:
        t = ring.send(s, b"x" * 100, mode="zerocopy")
        t.released(10)  # settles, whatever the outcome
        with pytest.raises(OSError) as info:
            t.result(0)
        assert info.value.errno in (errno.EPIPE, errno.ENOTCONN)
        assert not t.pinned


def test_many_sends_on_one_socket_keep_their_order_when_waited_in_turn(tcp):
    client, peer = tcp
    rx = Receiver(peer)
    parts = [os.urandom(n) for n in (1, 7, 4096, 65537, 3 * MB, 5)]
    with uringsend.Ring() as ring:
        for i, part in enumerate(parts):
            ring.send(client, part, mode="zerocopy" if i % 2 else "copy").result(10)
        ring.run_until_complete(10)
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"".join(parts)


def test_asyncio_ring_awaits_a_send():
    """``AsyncRing.send``: awaiting the handle gives the bytes sent, ``released()`` waits until the
    kernel let go of the buffer, which is then unpinned."""
    async def main():
        client, peer = tcp_pair()
        rx = Receiver(peer)
        data = bytearray(os.urandom(3 * MB))
        try:
            async with aio.AsyncRing(64) as aring:
                handle = aring.send(client, data, mode="zerocopy")
                transfer = handle.transfer
                assert await handle == len(data)
                assert await handle.released() == len(data)
                assert transfer.settled() and not transfer.pinned
            client.shutdown(socket.SHUT_WR)
            assert rx.join() == data
        finally:
            client.close()
            peer.close()
    asyncio.run(main())
