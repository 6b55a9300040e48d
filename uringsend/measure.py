"""Measuring uringsend against blocking splice, os.sendfile and read+send over loopback TCP.

Shared by ``python -m uringsend compare`` and the benchmark in the source tree (``python -m bench``):

- the contenders: how a server sends ``size`` bytes of an open file to a connected socket;
- the client process (``Worker``), forked before any file, socket or ring exists, so that the
  peer never shares a GIL (or a CPU-time account) with the sender;
- ``latency``: request sent -> last byte received at the client, per contender and size;
- ``cost_per_transfer``: the sender's CPU time per transfer, the client only reading and
  discarding.

Contenders take turns in rotated rounds, so that load from elsewhere on the machine falls on all of
them alike. Times are ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, the same clock in every process).
"""
import array
import contextlib
import fcntl
import math
import multiprocessing
import os
import selectors
import shutil
import socket
import statistics
import tempfile
import threading
import time

from . import Ring  # the public API only
from . import sendfile as _blocking_sendfile
from .ring import MODES

KiB, MiB = 1 << 10, 1 << 20

# ---- the contenders ----------------------------------------------------------------------------
REFERENCE = "splice"      # blocking splice through a pipe: what every ratio is taken against
SENDFILE = "sendfile"     # os.sendfile: the second reference of the cost per transfer
BLOCKING = ("splice", "sendfile", "read-send")
URING_MODES = tuple(m for m in MODES if m != "auto") + ("auto",)  # the engine's modes, then auto
STABLE_MODES = tuple(m for m in URING_MODES if m != "splice")  # modes that report "released"
CONTENDERS = BLOCKING + tuple(f"uringsend-{m}" for m in URING_MODES)
ONESHOT = "uringsend.sendfile"  # the blocking one-liner, mode auto
ALL = CONTENDERS + (ONESHOT,)
SMALL_SIZES = (4 * KiB, 64 * KiB)  # where the cost of each transfer, rather than of each byte, shows

WAIT_LIMIT = 120.0  # a limit turns a stuck transfer into an error, not a hung run


def uring_mode(name):
    """'uringsend-copy' -> 'copy'; None for any other contender."""
    return name[len("uringsend-"):] if name.startswith("uringsend-") else None


def is_stable(name):
    return uring_mode(name) in STABLE_MODES


class BlockingSplice:
    """splice(file -> pipe) then splice(pipe -> socket) until the pipe is empty, pipe kept open."""

    name = "splice"

    def __init__(self, pipe_size=MiB):
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, pipe_size)
        except OSError:
            pass  # past pipe-max-size: keep the default size
        self.capacity = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def send(self, sock, fd, size):
        sock_fd = sock.fileno()
        off = 0
        while off < size:
            n = os.splice(fd, self.w, min(self.capacity, size - off), offset_src=off)
            if n == 0:
                raise EOFError(f"file ended at {off} of {size} bytes")
            left = n
            while left:
                left -= os.splice(self.r, sock_fd, left)
            off += n
        return None

    def close(self):
        os.close(self.r)
        os.close(self.w)


class Sendfile:
    name = "sendfile"

    def send(self, sock, fd, size):
        sock_fd = sock.fileno()
        off = 0
        while off < size:
            n = os.sendfile(sock_fd, fd, off, size - off)
            if n == 0:
                raise EOFError(f"file ended at {off} of {size} bytes")
            off += n
        return None

    def close(self):
        pass


class ReadSend:
    """pread into one reused 1 MiB buffer, then sendall: the copying server."""

    name = "read-send"

    def __init__(self, buffer_size=MiB):
        self.view = memoryview(bytearray(buffer_size))

    def send(self, sock, fd, size):
        view = self.view
        off = 0
        while off < size:
            n = os.preadv(fd, [view[:min(len(view), size - off)]], off)
            if n == 0:
                raise EOFError(f"file ended at {off} of {size} bytes")
            sock.sendall(view[:n])
            off += n
        return None

    def close(self):
        self.view.release()


class Uring:
    """One Ring, one transfer per request: ``ring.sendfile`` then ``t.result()`` (and, for stable
    modes, ``t.released()``: a server may reuse or change the data only after that).
    ``send`` returns the time from submission to the last ``released`` event in stable modes."""

    def __init__(self, mode, **ring_options):
        self.mode = mode
        self.name = f"uringsend-{mode}"
        self.stable = mode in STABLE_MODES
        self.ring = Ring(**ring_options)

    def send(self, sock, fd, size):
        t = self.ring.sendfile(sock, fd, 0, size, mode=self.mode)
        t.result(WAIT_LIMIT)
        if not self.stable:
            return None
        t.released(WAIT_LIMIT)
        return t.released_ns - t.started_ns

    def counters(self):
        """(chunks copied, chunks sent zero-copy) so far, from the SEND_ZC notifications."""
        stats = self.ring.statistics()
        return stats.copied, stats.zerocopy

    def close(self):
        self.ring.close()


class Oneshot:
    """``uringsend.sendfile()``, the blocking one-liner, called as an application would."""

    name = ONESHOT

    def send(self, sock, fd, size):
        _blocking_sendfile(sock, fd, 0, size, mode="auto")  # returns once every page is released
        return None

    def close(self):
        pass


def make(name, pipe_size=MiB):
    mode = uring_mode(name)
    if mode is not None:
        return Uring(mode)
    if name == "splice":
        return BlockingSplice(pipe_size)
    if name == "sendfile":
        return Sendfile()
    if name == "read-send":
        return ReadSend()
    if name == ONESHOT:
        return Oneshot()
    raise ValueError(f"unknown contender {name!r}")


# ---- numbers -----------------------------------------------------------------------------------
def percentile(ordered, q):
    """Nearest rank, no interpolation: every reported value was measured."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_us(samples_ns):
    """n, p50, p99, p99.9, mean, max of nanosecond samples, in microseconds."""
    ordered = sorted(samples_ns)
    if not ordered:
        return {"n": 0}

    def us(v):
        return round(v / 1e3, 2)

    return {
        "n": len(ordered),
        "p50_us": us(percentile(ordered, 50)),
        "p99_us": us(percentile(ordered, 99)),
        "p999_us": us(percentile(ordered, 99.9)),
        "mean_us": us(sum(ordered) / len(ordered)),
        "max_us": us(ordered[-1]),
    }


def ratio(value, reference):
    if value is None or not reference:
        return None
    return round(value / reference, 3)


def rotated(items, k):
    items = list(items)
    k %= len(items)
    return items[k:] + items[:k]


def _quiet(msg):
    pass


# ---- files and connections ---------------------------------------------------------------------
class Workspace:
    """The files (one per size), written and synced: the page cache holds them, clean (no
    writeback during a run). Each is opened once, as a server would; ``fds`` maps size -> fd."""

    def __init__(self, sizes):
        self.dir = tempfile.mkdtemp(prefix="uringsend-measure-")
        self.fds = {}
        try:
            block = bytearray(os.urandom(MiB))
            for size in sorted(set(sizes)):
                path = os.path.join(self.dir, f"{size}.bin")
                with open(path, "wb") as f:
                    for i, off in enumerate(range(0, size, MiB)):
                        block[:8] = i.to_bytes(8, "little")  # no two MiB alike
                        f.write(block[:min(MiB, size - off)])
                    f.flush()
                    os.fsync(f.fileno())
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self.fds[size] = fd
                os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        except BaseException:
            self.close()
            raise

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """The listening socket; hands out accepted connections, TCP_NODELAY on both ends."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.address = self.listener.getsockname()

    def connect(self, worker, key, count):
        """Have ``worker`` open ``count`` connections filed under ``key``; returns ours."""
        worker.start("connect", key, self.address, count)
        conns = []
        try:
            for _ in range(count):
                conn, _ = self.listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns.append(conn)
            worker.result()
        except BaseException:
            for conn in conns:
                conn.close()
            raise
        return conns

    def close(self):
        self.listener.close()


# ---- the client process ------------------------------------------------------------------------
# Every request is one byte; the reply is exactly ``size`` bytes. A batch of requests ends with one
# more byte, END: within a batch the next request carries the ACK for the previous reply, and END
# does so for the last one, so no reply waits for a delayed-ACK timer to be released (a SEND_ZC
# buffer is released only once the peer has acknowledged its bytes).
REQUEST = b"?"
END = b"."


def connect(address):
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def fetch(sock, view, size):
    """One request; returns when all ``size`` reply bytes are in ``view``."""
    sock.send(REQUEST)
    got = sock.recv_into(view, size, socket.MSG_WAITALL)
    while got < size:  # WAITALL returns early on a signal
        n = sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError(f"server closed after {got} of {size} bytes")
        got += n


def client_latency(sock, size, n):
    """n requests back to back: request-to-last-byte times in ns."""
    view = memoryview(bytearray(size))
    out = array.array("q", bytes(8 * n))
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fetch(sock, view, size)
        out[i] = clock() - t0
    sock.send(END)
    return out


def sink(socks):
    """Read every socket until EOF and discard the bytes; returns {local port: bytes read}.
    TCP_QUICKACK after every read: a sender waiting for a release waits for this peer's ACK, and
    a delayed ACK (up to 40 ms) would stall it."""
    got = {s.getsockname()[1]: 0 for s in socks}
    buf = bytearray(MiB)
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        left = len(socks)
        while left:
            for key, _ in sel.select():
                n = key.fileobj.recv_into(buf)
                if n:
                    got[key.fileobj.getsockname()[1]] += n
                    key.fileobj.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                else:
                    sel.unregister(key.fileobj)
                    left -= 1
    return got


def _job_connect(socks, key, address, count):
    socks[key] = [connect(address) for _ in range(count)]
    return count


def _job_latency(socks, key, size, n):
    return client_latency(socks[key][0], size, n).tobytes()


def _job_sink(socks, key):
    group = socks.pop(key)
    try:
        return sink(group)
    finally:
        for sock in group:
            sock.close()


def _job_close(socks, key):
    for sock in socks.pop(key, ()):
        sock.close()


def _serve_jobs(pipe, parent_end, jobs):
    parent_end.close()  # the fork's copy: without it, the parent's exit would never read as EOF here
    socks = {}  # key -> list of connected sockets
    while True:
        try:
            job = pipe.recv()
        except EOFError:  # the parent went away
            break
        if job is None:
            break
        kind, key, *args = job
        try:
            if kind not in jobs:
                raise ValueError(f"unknown job {kind!r}")
            reply = jobs[kind](socks, key, *args)
        except Exception as exc:  # hand it to the parent, which raises it
            pipe.send(("error", f"{kind} job failed in the client process: {exc!r}"))
        else:
            pipe.send(("ok", reply))
    for group in socks.values():
        for sock in group:
            sock.close()


class Worker:
    """A client process. ``start`` a job, then ``result()``; ``call`` does both. A job is
    ``(kind, key, *args)``; ``jobs`` maps each kind to ``fn(socks, key, *args)``, ``socks`` being
    the process's dict of key -> connected sockets. Subclasses may add kinds."""

    jobs = {"connect": _job_connect, "latency": _job_latency, "sink": _job_sink, "close": _job_close}

    def __init__(self, name="uringsend-client"):
        ctx = multiprocessing.get_context("fork")
        self._pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_jobs, args=(child, self._pipe, dict(self.jobs)), daemon=True,
                                   name=name)
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


# ---- latency -----------------------------------------------------------------------------------
def serve(sender, conn, fd, size, n):
    """Answer a batch of n one-byte requests on ``conn``; returns the release times (ns)."""
    released = []
    for _ in range(n):
        if conn.recv(1) != REQUEST:
            raise ConnectionError("the client went away mid-run")
        r = sender.send(conn, fd, size)
        if r is not None:
            released.append(r)
    if conn.recv(1) != END:
        raise ConnectionError("the client did not end its batch")
    return released


class ZcCounter:
    """Per-key deltas of a uringsend sender's (copied, zerocopy) notification counters."""

    def __init__(self):
        self.totals = {}

    def around(self, sender, key, fn, *args):
        if not isinstance(sender, Uring):
            return fn(*args)
        c0, z0 = sender.counters()
        try:
            return fn(*args)
        finally:
            c1, z1 = sender.counters()
            c, z = self.totals.get(key, (0, 0))
            self.totals[key] = (c + c1 - c0, z + z1 - z0)

    def row(self, key):
        if key not in self.totals:
            return {}
        copied, zerocopy = self.totals[key]
        return {"chunks_copied": copied, "chunks_zerocopy": zerocopy}


BUDGET_WARMUP = 20  # warm-up requests per contender and size when counts come from a time budget


def warmup_count(requests):
    return max(3, requests // 20)


def _budget_counts(warm, names, sizes, rounds, seconds):
    """Requests per contender and size so that the rounds take about ``seconds``, from the
    warm-up's median latencies (the server's release wait and the batches' overhead added)."""
    counts = {}
    for size in sizes:
        per_request_ns = sum(statistics.median(warm[name, size]) * 1.5 + 10_000 for name in names)
        n = int(seconds / len(sizes) * 1e9 / per_request_ns)
        n = min(max(n, 5 * rounds), 50_000)
        counts[size] = n - n % rounds
    return counts


def latency(contenders, conns, worker, fds, sizes, rounds, counts=None, seconds=None, log=_quiet):
    """Request -> response latency at the client, one connection per contender, warm-up excluded;
    and, for stable modes, submission -> last chunk released at the server.

    ``contenders``: name -> sender; ``conns``: name -> our end of a connection whose other end the
    worker filed under the same name; ``fds``: size -> open file. ``counts``: size -> requests per
    contender, split over ``rounds``; without it, counts are derived from a time budget of
    ``seconds``. Returns (latency, release): name -> str(size) -> summary (``summary_us``)."""
    if counts is None and seconds is None:
        raise ValueError("latency() needs counts or seconds")
    names = list(contenders)
    warm = {}
    for name in names:
        for size in sizes:
            n = BUDGET_WARMUP if counts is None else warmup_count(counts[size])
            worker.start("latency", name, size, n)
            serve(contenders[name], conns[name], fds[size], size, n)
            warm[name, size] = memoryview(worker.result()).cast("q").tolist()
    if counts is None:
        counts = _budget_counts(warm, names, sizes, rounds, seconds)
    samples = {(name, size): [] for name in names for size in sizes}
    released = {(name, size): [] for name in names for size in sizes}
    zc = ZcCounter()
    for rnd in range(rounds):
        for name in rotated(names, rnd):
            sender, conn = contenders[name], conns[name]
            for size in sizes:
                n = max(1, counts[size] // rounds)
                worker.start("latency", name, size, n)
                released[name, size] += zc.around(sender, (name, size), serve, sender, conn, fds[size], size, n)
                samples[name, size].append(worker.result())
        log(f"latency round {rnd + 1}/{rounds} done")
    out, release = {}, {}
    for name in names:
        out[name] = {}
        for size in sizes:
            ns = [v for chunk in samples[name, size] for v in memoryview(chunk).cast("q")]
            out[name][str(size)] = summary_us(ns)
            out[name][str(size)].update(zc.row((name, size)))
            if released[name, size]:
                release.setdefault(name, {})[str(size)] = summary_us(released[name, size])
    return out, release


def add_latency_ratios(lat, reference=REFERENCE):
    """ratio_p50_vs_splice and ratio_p99_vs_splice in every row of a ``latency`` result."""
    for rows in lat.values():
        for size, row in rows.items():
            ref = lat[reference][size]
            row["ratio_p50_vs_splice"] = ratio(row.get("p50_us"), ref.get("p50_us"))
            row["ratio_p99_vs_splice"] = ratio(row.get("p99_us"), ref.get("p99_us"))
    return lat


# ---- cost per transfer -------------------------------------------------------------------------
def _slot(sender, conn, fd, size, slot_ns, at_least=10):
    """Send the file again and again for ``slot_ns`` (at least ``at_least`` times). Returns
    (transfers, process CPU ns, thread CPU ns, wall ns)."""
    clock, cpu, thread = time.perf_counter_ns, time.process_time_ns, time.thread_time_ns
    n = 0
    c0, t0, w0 = cpu(), thread(), clock()
    end = w0 + slot_ns
    while n < at_least or clock() < end:
        sender.send(conn, fd, size)
        n += 1
    w1, t1, c1 = clock(), thread(), cpu()
    return n, c1 - c0, t1 - t0, w1 - w0


def cost_per_transfer(names, server, worker, fds, sizes, rounds, seconds, log=_quiet):
    """The sender's CPU time per transfer: each contender sends one file again and again to a
    connection of its own whose other end the worker process reads and discards (its CPU is not
    counted), in rotated rounds lasting about ``seconds`` in all.

    CPU time is this process's (``time.process_time_ns``: every thread, io_uring's io-wq workers
    included; the client runs elsewhere); the sending thread's own time and the wall time are
    reported beside it. Every contender is made afresh and warmed up first, so its set-up is not
    counted; ``uringsend.sendfile()`` is called as an application would, and whatever it does per
    call is. The sending runs on a thread of its own that ends with the measurement: what a
    contender keeps per thread goes with it. Returns name -> str(size) -> medians over the rounds
    of µs per transfer, with the ratios to blocking splice and to os.sendfile."""
    outcome = {}

    def run():
        try:
            outcome["rows"] = _cost_per_transfer(list(names), server, worker, fds, sizes, rounds, seconds, log)
        except BaseException as exc:  # raised again on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="uringsend-measure-sender", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["rows"]


def _cost_per_transfer(names, server, worker, fds, sizes, rounds, seconds, log):
    slot_ns = int(seconds * 1e9 / (rounds * len(names) * len(sizes)))
    samples = {(name, size): [] for name in names for size in sizes}
    sent = dict.fromkeys(names, 0)
    senders = {}
    conns = dict(zip(names, server.connect(worker, "sink", len(names))))
    try:
        ports = {name: conn.getpeername()[1] for name, conn in conns.items()}  # the sink's keys
        worker.start("sink", "sink")
        try:
            for name in names:
                senders[name] = make(name)
            for name in names:  # warm-up: rings, pools, mappings, caches
                for size in sizes:
                    n, *_ = _slot(senders[name], conns[name], fds[size], size, slot_ns // 10, at_least=3)
                    sent[name] += n * size
            for rnd in range(rounds):
                for name in rotated(names, rnd):
                    for size in sizes:
                        n, cpu, thread, wall = _slot(senders[name], conns[name], fds[size], size, slot_ns)
                        sent[name] += n * size
                        samples[name, size].append((n, cpu / n, thread / n, wall / n))
                log(f"cost per transfer round {rnd + 1}/{rounds} done")
        finally:
            for conn in conns.values():  # EOF: the worker's sink returns
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    conn.close()
            received = worker.result()
    finally:
        for sender in senders.values():
            sender.close()
        for conn in conns.values():
            conn.close()
    for name in names:
        if received.get(ports[name]) != sent[name]:
            raise ConnectionError(f"{name}: the reader got {received.get(ports[name])} bytes, "
                                  f"{sent[name]} were sent")
    out = {}
    for name in names:
        out[name] = {}
        for size in sizes:
            rows = samples[name, size]
            out[name][str(size)] = {
                "transfers": sum(r[0] for r in rows),
                "rounds": len(rows),
                "cpu_us": round(statistics.median(r[1] for r in rows) / 1e3, 2),
                "thread_cpu_us": round(statistics.median(r[2] for r in rows) / 1e3, 2),
                "wall_us": round(statistics.median(r[3] for r in rows) / 1e3, 2),
                "cpu_us_per_round": [round(r[1] / 1e3, 2) for r in rows],
            }
    return add_cost_ratios(out)


def add_cost_ratios(cost):
    """ratio_cpu_vs_splice and ratio_cpu_vs_sendfile in every row of a ``cost_per_transfer``
    result (None where that reference was not measured)."""
    for rows in cost.values():
        for size, row in rows.items():
            for ref, field in ((REFERENCE, "ratio_cpu_vs_splice"), (SENDFILE, "ratio_cpu_vs_sendfile")):
                row[field] = ratio(row["cpu_us"], cost[ref][size]["cpu_us"]) if ref in cost else None
    return cost


# ---- the comparison run ------------------------------------------------------------------------
def compare(sizes=SMALL_SIZES, rounds=5, seconds=20.0, log=_quiet):
    """Cost per transfer and latency of every contender in ``ALL`` at each size, in about
    ``seconds`` of measuring (half each; warm-ups and set-up come on top). A JSON-ready dict:
    ``cost_per_transfer`` and ``latency`` (name -> str(size) -> row, with ratios), ``release``
    (stable modes: submission -> last chunk released, at the server), and what was run where."""
    sizes = sorted(set(sizes))
    began = time.monotonic()
    result = {"sizes": sizes, "rounds": rounds, "seconds": seconds, "contenders": list(ALL),
              "machine": {"kernel": os.uname().release, "cores": os.cpu_count(),
                          "loadavg_start": [round(x, 2) for x in os.getloadavg()]}}
    with contextlib.ExitStack() as stack:  # closes in the reverse order: rings and sockets first
        worker = Worker()  # forked first: it inherits no file, socket or ring
        stack.callback(worker.close)
        files = Workspace(sizes)
        stack.callback(files.close)
        server = Server()
        stack.callback(server.close)
        log(f"files ready; cost per transfer, {rounds} rounds")
        result["cost_per_transfer"] = cost_per_transfer(ALL, server, worker, files.fds, sizes, rounds,
                                                        seconds / 2, log)
        contenders, conns = {}, {}
        for name in ALL:
            conns[name] = server.connect(worker, name, 1)[0]
            stack.callback(conns[name].close)
            contenders[name] = make(name)
            stack.callback(contenders[name].close)
        lat, release = latency(contenders, conns, worker, files.fds, sizes, rounds, seconds=seconds / 2, log=log)
        result["latency"], result["release"] = add_latency_ratios(lat), release
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    return result
