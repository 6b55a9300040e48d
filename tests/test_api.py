"""The public API's conventions: Transfer as a future, sendfile() as socket.sendfile/os.sendfile,
headers and trailers, ``with Ring()`` exit semantics, frozen statistics and probe records."""
import concurrent.futures
import dataclasses
import logging
import os
import socket
import threading

import pytest

import uringsend
from uringsend import MODES, RELEASED, ReleaseNotReported, Ring, TransferCancelled
from helpers import Receiver, tcp_pair

RELEASING = [m for m in MODES if m != "splice"]


# ---- Transfer as a future ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_transfer_result_done_and_done_callbacks(mode, make_file, tcp):
    path, data = make_file(300_000)
    client, peer = tcp
    rx = Receiver(peer)
    calls = []
    with Ring() as ring:
        t = ring.sendfile(client, path, mode=mode)
        t.add_done_callback(calls.append)
        assert t.result(10) == len(data)
        assert t.done() and not t.running() and not t.cancelled()
        assert t.exception() is None
        assert calls == [t]  # exactly once, from the wait that saw it end
        late = []
        t.add_done_callback(late.append)  # already done: called at once
        assert late == [t]
        if mode != "splice":
            assert t.released(10) == len(data)
            assert t.settled()
        else:
            with pytest.raises(ReleaseNotReported):
                t.released(10)
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data


def test_done_callback_exceptions_are_logged_not_raised(make_file, tcp, caplog):
    path, data = make_file(100_000)
    client, peer = tcp
    rx = Receiver(peer)

    def boom(t):
        raise ZeroDivisionError("in a callback")

    with Ring() as ring:
        t = ring.sendfile(client, path, mode="copy")
        t.add_done_callback(boom)
        with caplog.at_level(logging.ERROR, logger="uringsend"):
            assert t.result(10) == len(data)
        assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data


@pytest.mark.parametrize("mode", RELEASING)
def test_release_callbacks_see_every_released_byte_once(mode, make_file, tcp):
    path, data = make_file(3 << 20)
    client, peer = tcp
    rx = Receiver(peer)
    early, settled = [], []
    with Ring(chunk_size=256 << 10, copy_chunk_size=256 << 10) as ring:
        t = ring.sendfile(client, path, mode=mode)
        t.add_release_callback(early.append)
        t.add_settled_callback(settled.append)
        assert t.released(30) == len(data)
        late = []
        t.add_release_callback(late.append)  # added after the fact: gets the whole history
        assert settled == [t]
    for got in (early, late):
        assert all(e.kind == RELEASED for e in got)
        assert sum(e.nbytes for e in got if e.offset is not None) == len(data)
        assert got == [e for e in t.events if e.kind == RELEASED]
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data


def test_a_raising_release_callback_is_raised_by_result_and_released(make_file, tcp):
    path, data = make_file(1 << 20)
    client, peer = tcp
    rx = Receiver(peer)
    with Ring() as ring:
        t = ring.sendfile(client, path, mode="copy")
        t.add_release_callback(lambda ev: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            t.released(10)
        with pytest.raises(ZeroDivisionError):
            t.result(10)
        assert t.sent == len(data)  # the transfer itself went on
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data


@pytest.mark.parametrize("mode", MODES)
def test_cancel_returns_true_while_running_and_false_once_done(mode, make_file):
    path, data = make_file(16 << 20)
    client, peer = tcp_pair(rcvbuf=8192)  # nobody reads: the transfer cannot finish
    with client, peer, Ring() as ring:
        t = ring.sendfile(client, path, mode=mode)
        ring.poll(0)
        assert t.running()
        assert t.cancel() is True
        assert t.cancel() is True  # asked already; still not done until the kernel answers
        with pytest.raises(TransferCancelled) as info:
            t.result(10)
        assert isinstance(info.value, concurrent.futures.CancelledError)
        assert t.cancelled() and t.done()
        with pytest.raises(TransferCancelled):
            t.exception(0)
        assert t.cancel() is False
        assert 0 <= t.sent < len(data)


def test_result_timeout_raises_and_the_transfer_goes_on(make_file):
    path, data = make_file(8 << 20)
    client, peer = tcp_pair(rcvbuf=8192)
    with client, peer, Ring() as ring:
        t = ring.sendfile(client, path, mode="copy")
        with pytest.raises(TimeoutError):
            t.result(0.05)  # a negative check by nature: the peer reads nothing
        assert t.running()
        rx = Receiver(peer)
        assert t.result(30) == len(data)
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data


# ---- uringsend.sendfile(): the stdlib's conventions -------------------------------------------
def test_sendfile_returns_bytes_sent_and_moves_the_file_position_like_socket_sendfile(make_file, tcp):
    path, data = make_file(200_000)
    client, peer = tcp
    rx = Receiver(peer)
    with open(path, "rb") as f:
        assert uringsend.sendfile(client, f) == len(data)
        assert f.tell() == len(data)
        assert uringsend.sendfile(client, f, 1000, 500) == 500
        assert f.tell() == 1500
        f.seek(7)
        # an fd for the socket: os.sendfile's convention, the position is left alone
        assert uringsend.sendfile(client.fileno(), f, 10, 20) == 20
        assert f.tell() == 7
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == data + data[1000:1500] + data[10:30]


def test_sendfile_argument_checks_match_the_stdlib(make_file, tcp):
    path, _ = make_file(1000)
    client, _ = tcp
    with open(path, "rb") as f:
        for call in (lambda s: s.sendfile(f, 0, 0), lambda s: uringsend.sendfile(s, f, 0, 0)):
            with pytest.raises(ValueError) as info:
                call(client)
            assert str(info.value) == "count must be a positive integer (got 0)"
        # with fds, as os.sendfile: count=0 sends nothing
        assert os.sendfile(client.fileno(), f.fileno(), 0, 0) == 0
        assert uringsend.sendfile(client.fileno(), f.fileno(), 0, 0) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for call in (lambda: udp.sendfile(f), lambda: uringsend.sendfile(udp, f),
                         lambda: Ring.sendfile(ring, udp, f)):
                with Ring() as ring, pytest.raises(ValueError) as info:
                    call()
                assert str(info.value) == "only SOCK_STREAM type sockets are supported"
    with open(path, "r") as text:
        for call in (lambda: client.sendfile(text), lambda: uringsend.sendfile(client, text)):
            with pytest.raises(ValueError) as info:
                call()
            assert str(info.value) == "file should be opened in binary mode"


# ---- headers and trailers ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_headers_and_trailers_frame_the_body_as_one_stream(mode, make_file, tcp):
    path, data = make_file(3 << 20)
    client, peer = tcp
    rx = Receiver(peer)
    with Ring() as ring:
        t = ring.sendfile(client, path, 5, len(data) - 10, mode=mode,
                          headers=[b"HTTP/1.1 200 OK\r\n", bytearray(b"X: 1\r\n\r\n")],
                          trailers=memoryview(b"--trailer--"))
        assert t.result(30) == len(data) - 10  # headers and trailers are not counted
        assert (t.header_sent, t.trailer_sent) == (25, 11)
        assert (t.header_len, t.trailer_len) == (25, 11)
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\n" + data[5:-5] + b"--trailer--"


def test_headers_and_trailers_around_an_empty_range_and_through_the_one_liner(make_file, tcp):
    path, data = make_file(4096)
    client, peer = tcp
    rx = Receiver(peer)
    with Ring() as ring:
        t = ring.sendfile(client, path, len(data), mode="copy", headers=b"[", trailers=(b"]", b"\n"))
        assert t.result(10) == 0 and t.trailer_sent == 2
    assert uringsend.sendfile(client, path, 0, 10, headers=b"<", trailers=b">") == 10
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == b"[]\n<" + data[:10] + b">"


def test_headers_and_trailers_must_be_bytes(make_file, tcp):
    path, _ = make_file(100)
    client, _ = tcp
    with Ring() as ring:
        for bad in ("text", 42, [b"ok", "text"]):
            for name in ("headers", "trailers"):
                with pytest.raises(TypeError, match=f"{name} must be a bytes-like object"):
                    ring.sendfile(client, path, **{name: bad})
        with pytest.raises(TypeError, match="not both"):
            ring.sendfile(client, path, headers=b"a", header=b"b")
        assert ring.statistics().transfers_started == 0


# ---- with Ring(): leaving the block ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_leaving_with_normally_finishes_transfers_whose_handles_were_dropped(mode, make_file):
    path, data = make_file(4 << 20)
    pairs = [tcp_pair(rcvbuf=65536) for _ in range(3)]
    receivers = [Receiver(peer) for _, peer in pairs]
    with Ring() as ring:
        for client, _ in pairs:
            ring.sendfile(client, path, mode=mode)  # the handle is dropped at once
    stats = ring.statistics()
    assert ring.closed and stats.kept_alive == 0
    for (client, peer), rx in zip(pairs, receivers):
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data
        client.close()
        peer.close()


@pytest.mark.parametrize("mode", MODES)
def test_leaving_with_by_an_exception_cancels_and_frees_nothing_early(mode, make_file):
    path, data = make_file(16 << 20)
    client, peer = tcp_pair(rcvbuf=8192)
    gate = threading.Event()
    rx = Receiver(peer, gate=gate)  # reads only once the transfer was cancelled
    with client, peer:
        with pytest.raises(KeyError):
            with Ring(close_timeout=60) as ring:
                t = ring.sendfile(client, path, mode=mode)
                t.add_done_callback(lambda t: gate.set())
                ring.poll(0)
                raise KeyError("leaving")
        assert ring.closed
        assert t.cancelled() and isinstance(t.error, TransferCancelled)
        # every completion and notification came back before the ring let go of its memory
        assert t.settled() and ring.statistics().kept_alive == 0
        assert t.sent < len(data)
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == data[:t.sent]


def test_close_without_cancel_finishes_first_and_its_timeout_cancels_the_rest(make_file):
    path, data = make_file(16 << 20)
    client, peer = tcp_pair(rcvbuf=8192)
    with client, peer:
        ring = Ring()
        t = ring.sendfile(client, path, mode="copy")
        ring.close(cancel=False, timeout=0.2)  # the peer reads nothing: the wait runs out
        assert t.cancelled() and t.settled()


# ---- records --------------------------------------------------------------------------------------
def test_statistics_and_probe_are_frozen_printable_records():
    with Ring() as ring:
        st = ring.statistics()
        with pytest.raises(dataclasses.FrozenInstanceError):
            st.enters = 1
        assert "transfers_started: 0" in str(st).splitlines()
        assert st.asdict()["sq_entries"] == ring.sq_entries
    info = uringsend.probe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.io_uring = False
    assert info.io_uring and "SEND_ZC" in info.opcodes
    assert str(info).startswith("kernel: ")


def test_tee_takes_the_sockets_first_like_sendfile(make_file, tcp):
    path, _ = make_file(100)
    client, _ = tcp
    with Ring() as ring, pytest.raises(TypeError, match=r"tee\(socks, file"):
        ring.tee(client, path)
