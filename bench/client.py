"""The client side of the benchmark's own sections (streaming and concurrent load), as jobs added
to ``uringsend.measure.Worker``: a process of its own, forked before the server creates any file,
socket or ring, so that it never shares a GIL with the server. The protocol (one-byte requests,
END after a batch) and the latency job are ``uringsend.measure``'s.
"""
import array
import threading
import time

from uringsend import measure

STREAM_BUFFER = 4 << 20  # large receive buffer for the throughput runs


def stream(sock, size, reps):
    """reps requests for a big reply read in STREAM_BUFFER pieces: per-request times in ns."""
    view = memoryview(bytearray(STREAM_BUFFER))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        sock.send(measure.REQUEST)
        got = 0
        while got < size:
            n = sock.recv_into(view, min(STREAM_BUFFER, size - got))
            if n == 0:
                raise ConnectionError(f"server closed after {got} of {size} bytes")
            got += n
        times.append(time.perf_counter_ns() - t0)
    sock.send(measure.END)
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
                measure.fetch(sock, view, size)
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


def _job_stream(socks, key, size, reps):
    return stream(socks[key][0], size, reps)


def _job_load(socks, key, size, warm_ns, end_ns):
    try:
        return load(socks[key], size, warm_ns, end_ns).tobytes()
    finally:
        for sock in socks.pop(key):  # EOF tells the server this load is over
            sock.close()


class Worker(measure.Worker):
    """A client process that also streams and loads."""

    jobs = {**measure.Worker.jobs, "stream": _job_stream, "load": _job_load}

    def __init__(self):
        super().__init__(name="bench-client")
