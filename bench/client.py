"""The client side, in worker processes of its own so that it never shares a GIL with the server.

A worker is forked before the server creates any file, socket or ring, then takes jobs over a
multiprocessing pipe. Every request is one byte; the reply is exactly ``size`` bytes. A batch of requests ends with
one more byte, END: within a batch the next request carries the ACK for the previous reply, and
END does so for the last one, so no reply waits for a delayed-ACK timer to be released (a SEND_ZC
buffer is released only once the peer has acknowledged its bytes). Times are
``time.perf_counter_ns()`` (CLOCK_MONOTONIC, the same clock in every process of this machine).
"""
import array
import multiprocessing
import socket
import threading
import time

STREAM_BUFFER = 4 << 20  # large receive buffer for the throughput runs
REQUEST = b"?"
END = b"."  # after the last request: the server reads it, and it carries the client's last ACK


def _connect(address):
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _fetch(sock, view, size):
    """One request; returns when all ``size`` reply bytes are in ``view``."""
    sock.send(REQUEST)
    got = sock.recv_into(view, size, socket.MSG_WAITALL)
    while got < size:  # WAITALL returns early on a signal
        n = sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError(f"server closed after {got} of {size} bytes")
        got += n


def latency(sock, size, n):
    """n requests back to back: request-to-last-byte times in ns."""
    view = memoryview(bytearray(size))
    out = array.array("q", bytes(8 * n))
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        _fetch(sock, view, size)
        out[i] = clock() - t0
    sock.send(END)
    return out


def stream(sock, size, reps):
    """reps requests for a big reply read in STREAM_BUFFER pieces: per-request times in ns."""
    view = memoryview(bytearray(STREAM_BUFFER))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        sock.send(REQUEST)
        got = 0
        while got < size:
            n = sock.recv_into(view, min(STREAM_BUFFER, size - got))
            if n == 0:
                raise ConnectionError(f"server closed after {got} of {size} bytes")
            got += n
        times.append(time.perf_counter_ns() - t0)
    sock.send(END)
    return times


def load(socks, size, warm_ns, end_ns):
    """One thread per connection, each fetching back to back until ``end_ns``. Returns the
    latencies (ns) of the requests that completed inside [warm_ns, end_ns]."""
    results = [None] * len(socks)
    errors = []

    def run(i, sock):
        view = memoryview(bytearray(size))
        kept = array.array("q")
        clock = time.perf_counter_ns
        try:
            while True:
                t0 = clock()
                if t0 >= end_ns:
                    break
                _fetch(sock, view, size)
                t1 = clock()
                if warm_ns <= t1 <= end_ns:
                    kept.append(t1 - t0)
        except OSError as exc:
            errors.append(repr(exc))
        results[i] = kept

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(socks)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise ConnectionError(f"{len(errors)} client connection(s) failed: {errors[0]}")
    out = array.array("q")
    for kept in results:
        out.extend(kept)
    return out


def _serve_jobs(pipe):
    socks = {}
    while True:
        job = pipe.recv()
        if job is None:
            break
        kind, key, *args = job
        try:
            if kind == "connect":
                address, count = args
                socks[key] = [_connect(address) for _ in range(count)]
                reply = count
            elif kind == "latency":
                reply = latency(socks[key][0], *args).tobytes()
            elif kind == "stream":
                reply = stream(socks[key][0], *args)
            elif kind == "load":
                try:
                    reply = load(socks[key], *args).tobytes()
                finally:
                    for sock in socks.pop(key):  # EOF tells the server this load is over
                        sock.close()
            elif kind == "close":
                for sock in socks.pop(key, ()):
                    sock.close()
                reply = None
            else:
                raise ValueError(f"unknown job {kind!r}")
        except Exception as exc:  # hand it to the parent, which raises it
            pipe.send(("error", f"{kind} job failed in the client process: {exc!r}"))
        else:
            pipe.send(("ok", reply))
    for group in socks.values():
        for sock in group:
            sock.close()


class Worker:
    """A client process. ``start`` a job, then ``result()``; ``call`` does both."""

    def __init__(self):
        ctx = multiprocessing.get_context("fork")
        self._pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_jobs, args=(child,), daemon=True, name="bench-client")
        self.process.start()
        child.close()

    def start(self, *job):
        self._pipe.send(job)

    def result(self):
        status, value = self._pipe.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def call(self, *job):
        self.start(*job)
        return self.result()

    def close(self):
        try:
            self._pipe.send(None)
        except OSError:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process.close()  # its sentinel pipes
        self._pipe.close()
