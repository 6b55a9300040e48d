"""The measurements. The server side runs on this process's main thread (the thread that owns the
rings); clients are Worker processes. Contenders take turns, in a rotated order each round, so that
load from elsewhere on the machine falls on all of them alike. Latency and cost per transfer are
``uringsend.measure``'s (shared with ``python -m uringsend compare``); the rest is the benchmark's.
"""
import os
import resource
import selectors
import threading
import time

import psutil

import uringsend
from uringsend import measure
from uringsend.measure import summary_us

MiB = 1 << 20
COST_SIZES = measure.SMALL_SIZES  # the cost per transfer


def latency(plan, contenders, conns, worker, files, log):
    """Request -> response latency at the client, one connection per contender, warm-up
    excluded; and, for stable modes, submission -> last chunk released at the server."""
    counts = {size: plan.requests(size) for size in plan.sizes}
    return measure.latency(contenders, conns, worker, files.fds, plan.sizes, plan.rounds, counts=counts, log=log)


def cost_per_transfer(plan, server, worker, files, log):
    """Sender CPU µs per transfer of a small file, the reader in the worker process; every
    contender and the blocking one-liner ``uringsend.sendfile()``."""
    return measure.cost_per_transfer(measure.ALL, server, worker, files.fds, COST_SIZES, plan.rounds,
                                     plan.cost_transfer_seconds, log)


def throughput(plan, contenders, conns, worker, files, log):
    """One big file per request, the client reading with large buffers; median and best GB/s."""
    size = plan.stream_size
    fd = files.fds[size]
    names = list(contenders)
    times = {name: [] for name in names}
    zc = measure.ZcCounter()
    for rnd in range(plan.stream_reps + 1):  # round 0 warms up
        for name in measure.rotated(names, rnd):
            worker.start("stream", name, size, 1)
            zc.around(contenders[name], name if rnd else "warm", measure.serve, contenders[name], conns[name], fd, size, 1)
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
    zc = measure.ZcCounter()
    out = {}
    for name in names:
        fds_before = proc.num_fds()
        sender = measure.make(name)
        try:
            worker.start("stream", name, size, plan.cost_reps)
            with MemoryWatch() as mem:
                cpu0, t0 = _cpu(), time.perf_counter()
                zc.around(sender, name, measure.serve, sender, conns[name], fd, size, plan.cost_reps)
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
        sender = measure.BlockingSplice(pipe_size=max(size, 64 << 10))
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
    return {"chunks_copied": stats.copied, "chunks_zerocopy": stats.zerocopy}


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
                extra = _one_ring(measure.uring_mode(name), conns, fd, size)
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


# ---- streaming from memory -----------------------------------------------------------------------
MEMORY_CHUNK = 64 << 10          # the application's writes
MEMORY_BLOCK = 64 << 20          # in-memory data, cycled through: the stream's bytes
MEMORY_WRITER_BUFFER = 4 << 20   # the stream writer's registered circular buffer
MEMORY_CONTENDERS = ("writer", "writer-auto", "writer-copy", "sendall", "ring-send-copy")


def _memory_chunks(block, size):
    left = size
    at = 0
    while left:
        n = min(MEMORY_CHUNK, left)
        if at + n > MEMORY_BLOCK:
            at = 0
        yield block[at:at + n]
        at += n
        left -= n


def _memory_serve(name, conn, ring, writers, block, size):
    """One request: ``size`` bytes of in-memory data in MEMORY_CHUNK writes, every byte released
    (for the writer: flushed, i.e. every SEND_ZC notification in) before the next request."""
    if conn.recv(1) != measure.REQUEST:
        raise ConnectionError("the client went away mid-run")
    if name in writers:
        writer = writers[name]
        for chunk in _memory_chunks(block, size):
            writer.write(chunk)
        writer.flush()
    elif name == "sendall":
        for chunk in _memory_chunks(block, size):
            conn.sendall(chunk)
    else:
        for chunk in _memory_chunks(block, size):
            ring.send(conn, chunk, mode="copy").result()  # one at a time: sends on a socket keep order
    if conn.recv(1) != measure.END:
        raise ConnectionError("the client did not end its batch")


def memory_stream(plan, server, worker, log):
    """In-memory data to a reader in the worker process: Ring.stream's writer (copy into the
    registered buffer, SEND_ZC from it, wait for every release; its mode 'auto', which turns to
    SEND once the kernel reports copying; its mode 'copy', SEND from the buffer) vs socket.sendall of the same chunks vs ring.send(mode='copy') per chunk. GB/s at the client and this process's CPU s/GB,
    contenders alternating in rotated rounds; medians."""
    size = plan.memory_size
    names = list(MEMORY_CONTENDERS)
    conns = {name: server.connect(worker, f"memory-{name}", 1)[0] for name in names}
    rates = {name: [] for name in names}
    cpus = {name: [] for name in names}
    block = memoryview(os.urandom(MEMORY_BLOCK))
    ring = uringsend.Ring()
    writers = {"writer": ring.stream(conns["writer"], MEMORY_WRITER_BUFFER),
               "writer-auto": ring.stream(conns["writer-auto"], MEMORY_WRITER_BUFFER, mode="auto"),
               "writer-copy": ring.stream(conns["writer-copy"], MEMORY_WRITER_BUFFER, mode="copy")}
    try:
        for rnd in range(plan.memory_reps + 1):  # round 0 warms up
            for name in measure.rotated(names, rnd):
                worker.start("stream", f"memory-{name}", size, 1)
                cpu0 = _cpu()
                _memory_serve(name, conns[name], ring, writers, block, size)
                cpu1 = _cpu()
                t = worker.result()[0]
                if rnd:
                    rates[name].append(size / t)
                    cpus[name].append((cpu1 - cpu0) / (size / 1e9))
        stats = writers["writer"].statistics()
        for writer in writers.values():
            writer.close()
    finally:
        ring.close()
        for name in names:
            worker.call("close", f"memory-{name}")
            conns[name].close()
    log("memory streaming done")
    out = {}
    for name in names:
        out[name] = {"bytes": size, "chunk": MEMORY_CHUNK, "reps": len(rates[name]),
                     "gbps": round(sorted(rates[name])[len(rates[name]) // 2], 3),
                     "cpu_s_per_gb": round(sorted(cpus[name])[len(cpus[name]) // 2], 3),
                     "gbps_all": [round(r, 3) for r in rates[name]]}
    out["writer"].update({"buffer": MEMORY_WRITER_BUFFER, "copied": stats["copied"],
                          "zerocopy": stats["zerocopy"], "waits": stats["waits"]})
    for name in names:
        out[name]["ratio_gbps_vs_sendall"] = round(out[name]["gbps"] / out["sendall"]["gbps"], 3)
        out[name]["ratio_cpu_vs_sendall"] = round(out[name]["cpu_s_per_gb"] / out["sendall"]["cpu_s_per_gb"], 3)
    return out
