"""What the tests share, defined once: the modes, socket pairs, one socket reader, one reader of
many sockets, a peer reset, the io-wq worker count, bounded polling for kernel state.

Waiting: a test waits on an event (a transfer's result, a reader's EOF, a callback). Where the
kernel changes something without telling anyone (thread lists), ``wait_for`` polls it, bounded.
A check that something does *not* happen has no event to wait on; those are named as such
(``_semantics.nothing_happens_for``) and used only there.
"""
import asyncio
import hashlib
import os
import selectors
import socket
import struct
import threading
import time

import uringsend

MODES = uringsend.MODES                                   # every mode a caller may ask for
ENGINE_MODES = tuple(m for m in MODES if m != "auto")     # the engine's own modes
RELEASING = tuple(m for m in ENGINE_MODES if m != "splice")  # modes that report releases
LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER {on, 0 s}: close() sends a reset
TIMEOUT = 60


def sha(data):
    return hashlib.sha256(data).hexdigest()


# ---- sockets --------------------------------------------------------------------------------------
def tcp_pair(rcvbuf=None, sndbuf=None, blocking=True):
    """A connected loopback TCP pair (client, peer). ``rcvbuf`` is set on the listener, so the
    peer's window starts small; ``sndbuf`` fixes the client's send buffer."""
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        if rcvbuf:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
    finally:
        srv.close()
    if sndbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if not blocking:
        client.setblocking(False)
        peer.setblocking(False)
    return client, peer


def unix_pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def reset(sock):
    """Close ``sock`` so that the other end gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    sock.close()


def read_exactly(sock, n, timeout=10):
    """Read exactly ``n`` bytes (fewer only at EOF) from a blocking socket."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                break
            out += chunk
    finally:
        sock.settimeout(None)
    return bytes(out)


async def read_async(sock, n):
    """Read ``n`` bytes (fewer only at EOF) from a non-blocking socket on the running loop."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, min(1 << 20, n - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Receiver:
    """Reads one socket in a thread until EOF; ``join()`` returns the bytes, or re-raises what the
    thread raised. With a ``gate`` (an Event) it waits for the gate once ``hold_at`` bytes arrived
    (0: before the first read). With ``reset_after``, once that many bytes arrived it resets the
    connection and stops (``reset`` is then True)."""

    def __init__(self, sock, gate=None, hold_at=0, reset_after=None):
        self.sock = sock
        self.gate = gate
        self.hold_at = hold_at
        self.reset_after = reset_after
        self.data = bytearray()
        self.reset = False
        self.error = None
        self.first_byte = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                n = len(self.data)
                want = 1 << 20
                if self.reset_after is not None:
                    if n >= self.reset_after:
                        self.reset = True
                        reset(self.sock)
                        return
                    want = min(want, self.reset_after - n)
                if self.gate is not None and not self.gate.is_set():
                    if n >= self.hold_at:
                        self.gate.wait()
                    else:
                        want = min(want, self.hold_at - n)
                chunk = self.sock.recv(want)
                if not chunk:
                    return
                self.data += chunk
                self.first_byte.set()
        except BaseException as exc:  # noqa: B036 - handed to join()
            self.error = exc

    def join(self, timeout=TIMEOUT):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"receiver did not see EOF within {timeout} s ({len(self.data)} bytes read)")
        if self.error is not None:
            raise self.error
        return bytes(self.data)


class Sink:
    """One thread reading every socket in ``socks`` until EOF or an error (kept per socket in
    ``errors``). ``join()`` returns, per socket, its bytes (``keep=True``) or
    ``(nbytes, sha256 hexdigest)``."""

    def __init__(self, socks, keep=True):
        self.socks = list(socks)
        self.keep = keep
        self.data = [bytearray() for _ in self.socks] if keep else None
        self.hashes = None if keep else [hashlib.sha256() for _ in self.socks]
        self.counts = [0] * len(self.socks)
        self.errors = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        # one reused buffer: a fresh 1 MiB bytes per recv() fragments this thread's malloc arena,
        # and its RSS would pass for the library's in a soak
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            for i, s in enumerate(self.socks):
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, i)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            open_ = len(self.socks)
            while open_:
                for key, _ in sel.select():
                    i = key.data
                    if i is None:
                        return  # stop() was called
                    try:
                        n = self.socks[i].recv_into(buf)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self.errors[i] = exc
                        n = 0
                    if not n:
                        sel.unregister(self.socks[i])
                        open_ -= 1
                        continue
                    self.counts[i] += n
                    if self.keep:
                        self.data[i] += view[:n]
                    else:
                        self.hashes[i].update(view[:n])
        finally:
            view.release()
            sel.close()

    def stop(self):
        self._wake_w.send(b"x")

    def join(self, timeout=TIMEOUT):
        self.thread.join(timeout)
        alive = self.thread.is_alive()
        if alive:
            self.stop()
            self.thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()
        assert not alive, f"sink did not see EOF on every socket: {self.counts}"
        if self.keep:
            return [bytes(d) for d in self.data]
        return [(n, h.hexdigest()) for n, h in zip(self.counts, self.hashes)]


# ---- the kernel's threads -----------------------------------------------------------------------
def io_wq_workers(tid=None):
    """io_uring worker threads of this process: those of task ``tid`` (named iou-wrk-<tid>), or
    every io_uring thread (iou-wrk-*, iou-sqp-*)."""
    prefix = f"iou-wrk-{tid}\n" if tid is not None else "iou-"
    n = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read()
        except FileNotFoundError:
            continue  # the thread exited while we looked
        n += name == prefix if tid is not None else name.startswith(prefix)
    return n


def wait_for(predicate, timeout=5.0, what="condition"):
    """Poll, bounded, a condition the kernel changes without telling anyone (thread lists)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
