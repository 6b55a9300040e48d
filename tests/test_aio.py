"""uringsend.aio: transfers driven by an asyncio loop through the ring's eventfd, with streams and
raw non-blocking sockets; cancellation never lets a buffer go before the kernel released it."""
import asyncio
import errno
import os
import resource
import socket

import pytest

import uringsend
import uringsend.aio
from uringsend import _lowlevel as ll
from uringsend.aio import AsyncRing
from uringsend.ring import SETUP_ATTEMPTS
from helpers import MODES, Sink, read_async, reset, sha, tcp_pair

ZC_MODES = ("zerocopy", "mmap")  # modes whose buffers wait for SEND_ZC notifications


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def accepted_flags():
    flags = [f for f in SETUP_ATTEMPTS if ll.try_setup(8, f) == 0]
    if not flags:
        pytest.skip("io_uring_setup accepts none of the ring's setup flag sets")
    return flags


async def _await(handle):
    return await handle


class CountingRing(AsyncRing):
    """Counts wake-ups that came through the eventfd (not from the reap after a submission)."""

    wakes = 0

    def _wake(self):
        self.wakes += 1
        super()._wake()


NO_DEFER = [i for i, f in enumerate(SETUP_ATTEMPTS) if not f & ll.SETUP_FLAGS["DEFER_TASKRUN"]]


@pytest.mark.parametrize("flags", NO_DEFER)
def test_eventfd_wakes_the_loop(flags, make_file):
    """A transfer that must wait for socket space completes only if the eventfd wakes the loop."""
    if SETUP_ATTEMPTS[flags] not in accepted_flags():
        pytest.skip(f"kernel refuses setup flags {SETUP_ATTEMPTS[flags]:#x}")
    path, data = make_file((8 << 20) + 11)

    async def main():
        client, peer = tcp_pair(rcvbuf=16384, blocking=False)
        with client, peer:
            async with CountingRing(setup_flags=SETUP_ATTEMPTS[flags]) as aring:
                handle = aring.sendfile(client, path, mode="copy")
                got = await read_async(peer, len(data))
                assert await handle == len(data)
                return got, aring.wakes

    got, wakes = run(main())
    assert sha(got) == sha(data)
    assert wakes > 0


def test_defer_taskrun_is_not_used():
    """A non-waiting GETEVENTS runs at most 20 deferred items and the rest get no new eventfd
    signal, so an event loop cannot drive a DEFER_TASKRUN ring (see uringsend.aio)."""
    async def main():
        async with AsyncRing() as aring:
            assert "DEFER_TASKRUN" not in aring.ring.setup_flags
        with pytest.raises(ValueError):
            AsyncRing(setup_flags=ll.SETUP_FLAGS["DEFER_TASKRUN"] | ll.SETUP_FLAGS["SINGLE_ISSUER"])

    run(main())


def test_hundreds_of_concurrent_transfers_all_finish(make_file):
    """600 sends to readers on small socket buffers: every socket becoming writable queues task
    work at once. (With DEFER_TASKRUN and non-waiting reaps this stalled for good.)"""
    count, size = 600, 256 << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * count:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {count} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * count), hard))
    path, data = make_file(size)
    pairs = [tcp_pair(rcvbuf=4096) for _ in range(count)]
    try:
        for client, peer in pairs:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            client.setblocking(False)
        sinks = []

        async def main():
            with open(path, "rb") as f:
                async with AsyncRing(1024) as aring:
                    handles = [aring.sendfile(client, f, mode="copy") for client, _ in pairs]
                    sinks.append(Sink([peer for _, peer in pairs], keep=False))  # read from now on
                    return await asyncio.gather(*(_await(h) for h in handles))

        assert run(main()) == [size] * count
        for client, _ in pairs:
            client.shutdown(socket.SHUT_WR)
        assert sinks[0].join() == [(size, sha(data))] * count
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for client, peer in pairs:
            client.close()
            peer.close()


@pytest.mark.parametrize("mode", MODES)
def test_streams_writer_then_header_and_body(mode, make_file):
    """A StreamWriter's bytes, flushed, come first; then the header and the body as one stream."""
    path, data = make_file((1 << 20) + 3)
    header = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data)

    async def main():
        async with AsyncRing() as aring:
            results = []

            async def handle(reader, writer):
                await reader.readline()
                writer.transport.set_write_buffer_limits(0)
                writer.write(b"preamble\n")
                await writer.drain()
                transfer = aring.sendfile(writer.get_extra_info("socket"), path, mode=mode, header=header)
                results.append(await transfer)
                writer.close()
                await writer.wait_closed()

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            async with server:
                reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
                writer.write(b"GET\n")
                got = await reader.read()
                writer.close()
                await writer.wait_closed()
            return got, results

    got, results = run(main())
    assert results == [len(data)]
    assert got[:9] == b"preamble\n" and got[9:9 + len(header)] == header
    assert sha(got[9 + len(header):]) == sha(data)


def test_streams_fully_flushed_before_the_transfer(make_file):
    """drain() returns once the transport's buffer is under its high-water mark (64 KiB), not
    empty; with the limits at 0 it returns only when everything was written, and a transfer
    started then cannot overtake bytes written through the StreamWriter."""
    path, data = make_file(1 << 20)
    preamble = os.urandom(4 << 20)

    async def main():
        async with AsyncRing() as aring:
            async def handle(reader, writer):
                await reader.readline()
                writer.transport.set_write_buffer_limits(0)
                writer.write(preamble)
                await writer.drain()
                assert writer.transport.get_write_buffer_size() == 0
                await aring.sendfile(writer.get_extra_info("socket"), path, header=b"H")
                writer.close()

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            async with server:
                reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
                writer.write(b"GET\n")
                got = await reader.read()
                writer.close()
                await writer.wait_closed()
            return got

    got = run(main())
    assert len(got) == len(preamble) + 1 + len(data)
    assert got[:len(preamble)] == preamble and got[len(preamble):] == b"H" + data


@pytest.mark.parametrize("mode", MODES)
def test_raw_nonblocking_socket(mode, make_file):
    path, data = make_file((3 << 20) + 5)

    async def main():
        client, peer = tcp_pair(rcvbuf=65536, blocking=False)
        with client, peer:
            async with AsyncRing() as aring:
                handle = aring.sendfile(client, path, mode=mode, header=b"head")
                got = await read_async(peer, len(data) + 4)
                sent = await handle
                if handle.mode == "splice":
                    with pytest.raises(uringsend.ReleaseNotReported):
                        await handle.released()
                else:
                    assert await handle.released() == sent
                return got, handle.transfer, aring.statistics()

    got, t, stats = run(main())
    assert got == b"head" + data and t.sent == len(data)
    if t.mode == "splice":
        assert all(e.kind == "queued" for e in t.events if e.offset is not None)
    else:
        assert t.settled()
        assert sum(e.nbytes for e in t.events if e.kind == "released" and e.offset is not None) == len(data)
    assert stats.pending_notifs == 0 and stats.transfers_active == 0


@pytest.mark.parametrize("mode", MODES)
def test_cancelling_the_awaiting_task_cancels_the_transfer(mode, make_file):
    """The peer does not read, so the transfer stalls; cancelling the task that awaits it cancels
    it. Zero-copy buffers stay held (the kernel still references them from the socket's queue)
    until the peer reads and the notifications arrive; the ring keeps reaping on its own until
    then, and only then do the buffers go back to the pool."""
    path, data = make_file(32 << 20)

    async def main():
        client, peer = tcp_pair(rcvbuf=16384, blocking=False)
        with client, peer:
            async with AsyncRing(trace=True) as aring:
                handle = aring.sendfile(client, path, mode=mode)
                task = asyncio.create_task(_await(handle))
                await asyncio.sleep(0)  # let the task start waiting
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                with pytest.raises(uringsend.TransferCancelled) as exc:
                    await handle
                assert exc.value.errno == errno.ECANCELED
                held = aring.statistics()
                got = await read_async(peer, handle.sent)
                if handle.mode != "splice":  # splice reports no release; it settles when done
                    assert await handle.released() == handle.sent  # what was sent, released
                return handle.transfer, held, aring.statistics(), got, aring.ring.trace()

    t, held, stats, got, trace = run(main())
    assert t.done() and t.settled() and t.sent < len(data)
    assert got == data[:t.sent]
    if t.mode in ZC_MODES:
        assert held.pending_notifs > 0
        if t.mode == "zerocopy":
            assert held.buffers_free < held.buffers_total
        zc = {e.user_data for e in trace if e.zerocopy and e.flags & ll.IORING_CQE_F_MORE}
        notified = {e.user_data for e in trace if e.notif}
        assert zc and zc <= notified
    assert stats.pending_notifs == 0 and stats.pending_ops == 0
    assert stats.buffers_free == stats.buffers_total


def test_streams_peer_reset_mid_send(make_file):
    """A peer reset makes the stream transport close its socket; the transfer (on its own fd)
    fails with the socket's error and nothing else is written to a reused fd number."""
    path, data = make_file(32 << 20)

    async def main():
        async with AsyncRing() as aring:
            outcome = asyncio.get_running_loop().create_future()

            async def handle(reader, writer):
                await reader.readline()
                transfer = aring.sendfile(writer.get_extra_info("socket"), path)
                try:
                    await transfer
                    outcome.set_result(None)
                except OSError as exc:
                    outcome.set_result(exc)
                writer.close()

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            async with server:
                client = socket.create_connection(server.sockets[0].getsockname()[:2])
                client.setblocking(False)
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(client, b"GET\n")
                await loop.sock_recv(client, 65536)  # the body is flowing
                reset(client)
                # fd numbers freed by the transport are taken again at once
                reused = [socket.socketpair() for _ in range(4)]
                error = await outcome
                leaked = []
                for a, b in reused:
                    b.setblocking(False)
                    try:
                        leaked.append(b.recv(1))
                    except BlockingIOError:
                        pass
                    a.close()
                    b.close()
                return error, leaked, aring.statistics()

    error, leaked, stats = run(main())
    assert isinstance(error, (ConnectionResetError, BrokenPipeError))
    assert leaked == []
    assert stats.transfers_active == 0


def test_closing_the_callers_socket_does_not_redirect_the_transfer(make_file):
    """The transfer holds its own fd: closing the caller's socket object mid-send frees the fd
    number, and a socket that takes it receives nothing; the original peer gets every byte."""
    path, data = make_file(8 << 20)

    async def main():
        client, peer = tcp_pair(rcvbuf=16384, blocking=False)
        with peer:
            async with AsyncRing() as aring:
                handle = aring.sendfile(client, path, mode="copy")
                number = client.fileno()
                client.close()
                a, b = socket.socketpair()
                with a, b:
                    assert number in (a.fileno(), b.fileno())
                    got = await read_async(peer, len(data))
                    assert await handle == len(data)
                    b.setblocking(False)
                    a.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        (b if a.fileno() == number else a).recv(1)
                return got

    assert sha(run(main())) == sha(data)


def test_caller_may_close_its_fds_at_once(make_file):
    """The transfer holds duplicates of both fds: closing the caller's right after sendfile()
    changes nothing for the peer."""
    path, data = make_file(3 << 20)

    async def main():
        client, peer = tcp_pair(rcvbuf=16384, blocking=False)
        with peer:
            async with AsyncRing() as aring:
                fd = os.open(path, os.O_RDONLY)
                handle = aring.sendfile(client, fd, mode="mmap")
                os.close(fd)
                client.close()
                got = await read_async(peer, len(data))
                assert await handle.released() == len(data)
                return got

    assert sha(run(main())) == sha(data)


@pytest.mark.parametrize("mode", ["auto", "zerocopy", "splice"])
def test_sendfile_convenience(mode, make_file):
    path, data = make_file((2 << 20) + 1)

    async def main():
        client, peer = tcp_pair(blocking=False)
        with client, peer:
            reader = asyncio.create_task(read_async(peer, len(data) + 2))
            sent = await uringsend.aio.sendfile(client, path, mode=mode, headers=b"h\n")
            return sent, await reader

    sent, got = run(main())
    assert got == b"h\n" + data and sent == len(data)


def test_cancelled_convenience_call_closes_its_ring(make_file):
    """The cancelled call's own ring waits for the kernel's releases (the peer must read for
    them to come) before it closes; the peer got an exact prefix of the file."""
    path, data = make_file(32 << 20)

    async def main():
        client, peer = tcp_pair(rcvbuf=16384, blocking=False)
        with client, peer:
            got = bytearray()

            async def drain():
                loop = asyncio.get_running_loop()
                while True:
                    got.extend(await loop.sock_recv(peer, 1 << 20))

            task = asyncio.create_task(uringsend.aio.sendfile(client, path, mode="zerocopy"))
            await asyncio.sleep(0)  # the call has submitted and waits
            task.cancel()
            reader = asyncio.create_task(drain())
            with pytest.raises(asyncio.CancelledError):
                await task
            reader.cancel()
            try:
                while True:
                    got.extend(peer.recv(1 << 20))
            except BlockingIOError:
                pass
            return bytes(got)

    got = run(main())
    assert len(got) < len(data) and got == data[:len(got)]


def test_aclose_cancels_running_transfers(make_file):
    path, data = make_file(32 << 20)

    async def main():
        client, peer = tcp_pair(rcvbuf=16384, blocking=False)
        with client, peer:
            aring = AsyncRing()
            handle = aring.sendfile(client, path, mode="zerocopy")
            closing = asyncio.create_task(aring.aclose())
            with pytest.raises(uringsend.TransferCancelled):
                await handle
            got = await read_async(peer, handle.sent)  # lets the kernel release the buffers
            await closing
            assert aring.closed and aring.ring.kept_alive == 0
            with pytest.raises(ValueError):
                aring.sendfile(client, path)
            return handle.transfer, got

    t, got = run(main())
    assert t.settled() and t.sent < len(data) and got == data[:t.sent]


def test_aclose_keeps_unreleased_memory_alive(make_file):
    """A peer that never reads keeps zero-copy buffers referenced: when the close times out the
    ring keeps that memory for the life of the process rather than free it under the kernel."""
    path, data = make_file(32 << 20)

    async def main():
        client, peer = tcp_pair(rcvbuf=16384, blocking=False)
        with client, peer:
            aring = AsyncRing()
            handle = aring.sendfile(client, path, mode="zerocopy")
            with pytest.warns(ResourceWarning):
                await aring.aclose(timeout=0.2)
            assert aring.closed and aring.ring.kept_alive > 0
            with pytest.raises(ValueError):
                await handle.released()
            return handle.transfer

    t = run(main())
    assert t.done() and not t.settled()


def test_needs_a_running_loop():
    with pytest.raises(RuntimeError):
        AsyncRing()
