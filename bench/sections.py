"""The measurements. The server side runs on this process's main thread (the thread that owns the
rings); clients are Worker processes. Contenders take turns, in a rotated order each round, so that
load from elsewhere on the machine falls on all of them alike.
"""
import os
import resource
import selectors
import shutil
import socket
import tempfile
import threading
import time

import psutil

import uringsend

from . import senders
from .client import END, REQUEST
from .stats import summary_us

MiB = 1 << 20


class Workspace:
    """The files (one per size), written and synced: the page cache holds them, clean (no
    writeback during a run). Each is opened once, as a server would."""

    def __init__(self, sizes):
        self.dir = tempfile.mkdtemp(prefix="uringsend-bench-")
        self.fds = {}
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
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
            self.fds[size] = fd

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
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
        for _ in range(count):
            conn, _ = self.listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append(conn)
        worker.result()
        return conns

    def close(self):
        self.listener.close()


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


def _rotated(items, k):
    k %= len(items)
    return items[k:] + items[:k]


class ZcCounter:
    """Per-key deltas of a uringsend sender's (copied, zerocopy) notification counters."""

    def __init__(self):
        self.totals = {}

    def around(self, sender, key, fn, *args):
        if not isinstance(sender, senders.Uring):
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


def latency(plan, contenders, conns, worker, files, log):
    """Request -> response latency at the client, one connection per contender, warm-up
    excluded; and, for stable modes, submission -> last chunk released at the server."""
    samples = {(name, size): [] for name in contenders for size in plan.sizes}
    released = {(name, size): [] for name in contenders for size in plan.sizes}
    zc = ZcCounter()
    names = list(contenders)
    for name in names:
        for size in plan.sizes:
            warm = plan.warmup(size)
            worker.start("latency", name, size, warm)
            serve(contenders[name], conns[name], files.fds[size], size, warm)
            worker.result()
    for rnd in range(plan.rounds):
        for name in _rotated(names, rnd):
            sender, conn = contenders[name], conns[name]
            for size in plan.sizes:
                n = plan.requests(size) // plan.rounds
                worker.start("latency", name, size, n)
                released[name, size] += zc.around(sender, (name, size), serve, sender, conn,
                                                  files.fds[size], size, n)
                samples[name, size].append(worker.result())
        log(f"latency round {rnd + 1}/{plan.rounds} done")
    out, release = {}, {}
    for name in names:
        out[name] = {}
        for size in plan.sizes:
            ns = [v for chunk in samples[name, size] for v in memoryview(chunk).cast("q")]
            out[name][str(size)] = summary_us(ns)
            out[name][str(size)].update(zc.row((name, size)))
            if released[name, size]:
                release.setdefault(name, {})[str(size)] = summary_us(released[name, size])
    return out, release


def throughput(plan, contenders, conns, worker, files, log):
    """One big file per request, the client reading with large buffers; median and best GB/s."""
    size = plan.stream_size
    fd = files.fds[size]
    names = list(contenders)
    times = {name: [] for name in names}
    zc = ZcCounter()
    for rnd in range(plan.stream_reps + 1):  # round 0 warms up
        for name in _rotated(names, rnd):
            worker.start("stream", name, size, 1)
            zc.around(contenders[name], name if rnd else "warm", serve, contenders[name], conns[name], fd, size, 1)
            t = worker.result()[0]
            if rnd:
                times[name].append(t)
    log("throughput done")
    out = {}
    for name in names:
        ordered = sorted(times[name])
        median = ordered[len(ordered) // 2]
        out[name] = {"bytes": size, "reps": len(ordered),
                     "gbps": round(size / median, 3),        # bytes per ns = GB/s
                     "gbps_best": round(size / ordered[0], 3),
                     "seconds": [round(t / 1e9, 4) for t in times[name]]}
        out[name].update(zc.row(name))
    return out


class MemoryWatch:
    """Peak RSS growth over a block: VmHWM (reset first through clear_refs) minus the starting RSS,
    plus the anonymous / file-backed parts sampled every few ms (file pages mapped by a process
    count in its RSS although they belong to the page cache)."""

    FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, period=0.002):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = {}

    @classmethod
    def read(cls):
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in cls.FIELDS:
                    out[key] = int(value.split()[0]) * 1024
        return out

    def _sample(self):
        while not self._stop.is_set():
            now = self.read()
            for key in ("RssAnon", "RssFile", "RssShmem"):
                self.peak[key] = max(self.peak.get(key, 0), now[key])
            self._stop.wait(self.period)

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.start = self.read()
        self.peak = {key: self.start[key] for key in ("RssAnon", "RssFile", "RssShmem")}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        end = self.read()
        for key in ("RssAnon", "RssFile", "RssShmem"):
            self.peak[key] = max(self.peak[key], end[key])
        self.growth = {
            "rss_peak_growth_mib": round((end["VmHWM"] - self.start["VmRSS"]) / MiB, 2),
            "rss_anon_peak_growth_mib": round((self.peak["RssAnon"] - self.start["RssAnon"]) / MiB, 2),
            "rss_file_peak_growth_mib": round((self.peak["RssFile"] + self.peak["RssShmem"]
                                               - self.start["RssFile"] - self.start["RssShmem"]) / MiB, 2),
        }


def _cpu():
    """User + system CPU seconds of this process: every thread, io_uring's io-wq workers
    included. getrusage, not psutil.cpu_times: the latter counts in 10 ms clock ticks."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cost(plan, names, conns, worker, files, log):
    """CPU seconds per GB of this (server) process, peak RSS growth and open fds (before the
    sender exists, after its transfers, after it closed) over cost_reps transfers of the big file. Each contender starts fresh (a new Ring: no mapping, no registered
    buffers yet), so what a server pays to get going is counted. The client's CPU is its own."""
    size = plan.stream_size
    fd = files.fds[size]
    proc = psutil.Process()
    zc = ZcCounter()
    out = {}
    for name in names:
        fds_before = proc.num_fds()
        sender = senders.make(name)
        try:
            worker.start("stream", name, size, plan.cost_reps)
            with MemoryWatch() as mem:
                cpu0, t0 = _cpu(), time.perf_counter()
                zc.around(sender, name, serve, sender, conns[name], fd, size, plan.cost_reps)
                cpu1, t1 = _cpu(), time.perf_counter()
            worker.result()
            fds_open = proc.num_fds()
        finally:
            sender.close()
        gb = size * plan.cost_reps / 1e9
        out[name] = {"bytes": size * plan.cost_reps, "cpu_s": round(cpu1 - cpu0, 3),
                     "cpu_s_per_gb": round((cpu1 - cpu0) / gb, 3), "wall_s": round(t1 - t0, 3),
                     **mem.growth, "fds_before": fds_before, "fds_open": fds_open,
                     "fds_after": proc.num_fds()}
        out[name].update(zc.row(name))
    log("cost done")
    return out


class CpuWindow:
    """This process's CPU seconds between two perf_counter_ns instants (a timer thread reads them,
    so the servers' own loops stay untouched)."""

    def __init__(self, start_ns, end_ns):
        self._marks = []
        self._thread = threading.Thread(target=self._run, args=(start_ns, end_ns), daemon=True)
        self._thread.start()

    def _run(self, *instants):
        for instant in instants:
            time.sleep(max(0.0, (instant - time.perf_counter_ns()) / 1e9))
            self._marks.append(_cpu())

    def seconds(self):
        self._thread.join()
        return self._marks[1] - self._marks[0]


def _threads_splice(conns, fd, size):
    """The reference server: a thread per client, each with its pipe, blocking splice."""
    errors = []

    def run(conn):
        sender = senders.BlockingSplice(pipe_size=max(size, 64 << 10))
        try:
            while conn.recv(1):
                sender.send(conn, fd, size)
        except OSError as exc:
            errors.append(exc)
        finally:
            sender.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return {}


def _one_ring(mode, conns, fd, size):
    """One thread, one ring: a selector reads the one-byte requests (and the ring's eventfd);
    every request becomes ``ring.sendfile``; completions are reaped with ``ring.poll``."""
    sel = selectors.DefaultSelector()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    last = {}
    errors = []
    with uringsend.Ring() as ring:
        ring.register_eventfd(efd)
        sel.register(efd, selectors.EVENT_READ)
        for conn in conns:
            sel.register(conn, selectors.EVENT_READ)
        open_conns = len(conns)
        while open_conns:
            for key, _ in sel.select():
                if key.fd == efd:
                    try:
                        os.eventfd_read(efd)
                    except BlockingIOError:
                        pass
                    continue
                conn = key.fileobj
                if not conn.recv(1):
                    sel.unregister(conn)
                    open_conns -= 1
                    continue
                prev = last.get(conn)
                if prev is not None and prev.error is not None:
                    errors.append(prev.error)
                last[conn] = ring.sendfile(conn, fd, 0, size, mode=mode)
            while ring.poll(0):
                pass
        ring.run_until_complete(120)
        errors += [t.error for t in last.values() if t.error is not None]
        stats = ring.statistics()
    sel.close()
    os.close(efd)
    if errors:
        raise errors[0]
    return {"chunks_copied": stats["copied"], "chunks_zerocopy": stats["zerocopy"]}


def concurrency(plan, modes, server, workers, files, log):
    """N clients each fetching plan.concurrency_size back to back for a fixed time: total
    throughput and latency, thread-per-client blocking splice vs one uringsend thread."""
    size = plan.concurrency_size
    fd = files.fds[size]
    out = {}
    servers = ["splice-threads"] + [f"uringsend-{m}" for m in modes]
    for n in plan.clients:
        out[str(n)] = {}
        for name in servers:
            share = [n // len(workers) + (i < n % len(workers)) for i in range(len(workers))]
            conns = []
            for worker, k in zip(workers, share):
                if k:
                    conns += server.connect(worker, name, k)
            warm_ns = time.perf_counter_ns() + int(plan.concurrency_warmup * 1e9)
            end_ns = warm_ns + int(plan.concurrency_duration * 1e9)
            busy = [w for w, k in zip(workers, share) if k]
            for worker in busy:
                worker.start("load", name, size, warm_ns, end_ns)
            cpu = CpuWindow(warm_ns, end_ns)
            if name == "splice-threads":
                extra = _threads_splice(conns, fd, size)
            else:
                extra = _one_ring(senders.uring_mode(name), conns, fd, size)
            ns = [v for w in busy for v in memoryview(w.result()).cast("q")]
            for conn in conns:
                conn.close()
            window = plan.concurrency_duration
            row = summary_us(ns)
            gb = len(ns) * size / 1e9
            row.update({"clients": n, "requests": len(ns), "gbps": round(gb / window, 3),
                        "requests_per_s": round(len(ns) / window),
                        "cpu_s_per_gb": round(cpu.seconds() / gb, 3) if gb else None, **extra})
            out[str(n)][name] = row
        log(f"concurrency {n} clients done")
    return out
