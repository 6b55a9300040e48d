"""Seeded randomized stress through the public API only.

Each seed drives a series of steps. A step starts transfers of every mode (and tee groups) on one
ring, from files of many sizes and ranges, over TCP and UNIX sockets, then mixes in, at random
points: polls, cancels, peer resets (SO_LINGER 0), a peer that starts reading late, files
truncated, rewritten in place or replaced under the transfer, callers closing their socket or file
early, waits on single transfers. It ends by waiting for everything to settle or by closing the
ring with work in flight. Then every transfer is checked against what the API documents:

- the peer received header[:header_sent] + file[offset:offset + sent] (a peer that reset: a prefix
  of it). Where the file was changed under the transfer, a byte may be the original or the new one
  (a zero past a truncation), except in ranges the transfer had reported 'released' before the
  change: those reach the peer as they were.
- the outcome (error or not, sent, short) is one the API allows for what was done to the transfer.
- 'sent' (or 'queued' in splice mode and tee) events tile [offset, offset + sent) in order; in the
  modes that report releases, 'released' events tile it exactly once, each after its bytes were
  sent, and on_release saw each of them.
- statistics are idle once everything settled; no fd is left open after a ring is closed.

URINGSEND_STRESS_STEPS sets the steps per seed (default 120); URINGSEND_STRESS_SEEDS="7,19" runs
those seeds, URINGSEND_STRESS_SEEDS=5 five more. The plan is seeded; what the kernel does meanwhile
is not, so the same seed explores nearby interleavings on each run. A failure names its seed and
step, the step's actions and every transfer's state.
"""
import collections
import errno
import os
import random
import socket
import threading
import time

import psutil
import pytest

from uringsend import ReleaseNotReported, Ring, TransferCancelled
from helpers import MODES, Receiver, tcp_pair, unix_pair


SEEDS = [11, 23, 37, 52]
STEPS = int(os.environ.get("URINGSEND_STRESS_STEPS", "120"))
SLOW_SEEDS = [101, 202, 303, 404, 505, 606]
SLOW_STEPS = 400
SENT, RELEASED, QUEUED = "sent", "released", "queued"
MIB = 1 << 20
TIMEOUT = 60  # seconds for any one wait: a hang fails the test instead of blocking it


def _seeds():
    """URINGSEND_STRESS_SEEDS: "7,19" runs exactly those seeds; "5" adds five more seeds."""
    spec = os.environ.get("URINGSEND_STRESS_SEEDS", "").strip()
    if not spec:
        return SEEDS
    if "," in spec:
        return [int(s) for s in spec.split(",") if s.strip()]
    return SEEDS + [1000 + i for i in range(int(spec))]


# ---- byte checks ------------------------------------------------------------------------------
def _nonzero_bytes(x, ones):
    """Bit 0 of each byte of the result is set where that byte of ``x`` is non-zero."""
    x |= x >> 4
    x |= x >> 2
    x |= x >> 1
    return x & ones


def first_neither(got, a, b):
    """Index of the first byte of ``got`` equal neither to ``a``'s nor to ``b``'s, or -1."""
    assert len(got) == len(a) == len(b)
    if not got:
        return -1
    ones = int.from_bytes(b"\x01" * len(got), "little")
    g = int.from_bytes(got, "little")
    bad = (_nonzero_bytes(g ^ int.from_bytes(a, "little"), ones)
           & _nonzero_bytes(g ^ int.from_bytes(b, "little"), ones))
    if not bad:
        return -1
    return ((bad & -bad).bit_length() - 1) // 8


def first_difference(got, want):
    if got == want:
        return -1
    return next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)


def subtract(intervals, holes):
    """``intervals`` minus ``holes``; both lists of (start, end, ...); extra fields are kept."""
    out = []
    for iv in intervals:
        pieces = [iv]
        for h0, h1 in holes:
            nxt = []
            for p in pieces:
                a, b = p[0], p[1]
                if h1 <= a or h0 >= b:
                    nxt.append(p)
                    continue
                if a < h0:
                    nxt.append((a, h0) + tuple(p[2:]))
                if h1 < b:
                    nxt.append((h1, b) + tuple(p[2:]))
            pieces = nxt
        out.extend(pieces)
    return sorted(out)


def covered(intervals):
    """Merge (start, end) intervals."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# ---- peers, files, jobs -----------------------------------------------------------------------
class Peer(Receiver):
    """A Receiver that closes its socket once it has read to EOF (a reset one is closed already)."""

    def join(self, timeout=TIMEOUT):
        data = super().join(timeout)
        if not self.reset:
            self.sock.close()
        return data


class File:
    """A real file of random bytes and what was done to it while transfers ran."""

    def __init__(self, path, content):
        self.path = path
        self.content = content        # as written before any transfer started
        self.jobs = []                # transfers reading it
        self.changes = []             # (start, end, bytes a transfer may show instead)
        self.truncated_to = None
        self.mutated = None           # what was done: None, "rewrite", "truncate", "replace"
        self.handles = []             # the caller's fds and file objects


class Job:
    """One transfer (a tee group has one Job per socket) and what the test did to it."""

    def __init__(self, kind, file, offset, count, header, client, peer, gate, unix):
        self.kind = kind              # "sendfile" or "tee"
        self.file = file
        self.offset = offset
        self.count = count
        self.header = header
        self.client = client
        self.peer = peer
        self.gate = gate
        self.unix = unix
        self.t = None
        self.group = None             # the tee group's jobs
        self.callback = None          # events seen by on_release, when one was given
        self.size_at_start = len(file.content)
        self.planned = min(self.size_at_start - offset, count if count is not None else 1 << 62)
        self.cancelled = False        # cancel() was called before the transfer was done
        self.closed_running = False   # its ring was closed before it was done
        self.strict = []              # ranges released before a change to the file: must be exact
        self.client_closed = False
        self.last = (0, 0)

    @property
    def stable(self):
        return self.kind == "sendfile" and self.t.mode != "splice"

    def describe(self):
        t = self.t
        return (f"{self.kind} mode={getattr(t, 'mode', '?')} {'unix' if self.unix else 'tcp'} "
                f"size={self.size_at_start} offset={self.offset} count={self.count} "
                f"header={len(self.header)} planned={self.planned} cancelled={self.cancelled} "
                f"ring_closed_running={self.closed_running} reset_after={self.peer.reset_after} "
                f"peer_reset={self.peer.reset} file_change={self.file.mutated} "
                f"truncated_to={self.file.truncated_to} -> sent={t.sent} header_sent={t.header_sent} "
                f"error={t.error!r}")

    def released_ranges(self):
        return covered((e.offset, e.offset + e.nbytes) for e in self.t.events
                       if e.kind == RELEASED and e.offset is not None)


# ---- the run ----------------------------------------------------------------------------------
class Stress:
    def __init__(self, seed, steps, tmp_path):
        self.seed = seed
        self.steps = steps
        self.rng = random.Random(seed)
        self.tmp = tmp_path
        self.ring = None
        self.proc = psutil.Process()
        self.fds = self.proc.num_fds()
        self.files = 0
        self.log = []
        self.jobs = []
        self.step_files = []
        self.tally = collections.Counter()

    # -- set-up --
    def new_ring(self):
        rng = self.rng
        kw = dict(entries=rng.choice([8, 16, 64, 256]),
                  buffers=rng.choice([1, 2, 4, 16]),
                  buffer_size=rng.choice([4096, 16384, 65536, 256 << 10]),
                  chunk_size=rng.choice([4096, 65536, MIB]),
                  copy_chunk_size=rng.choice([4096, 65536, MIB]),
                  pipe_size=rng.choice([None, 4096, 65536]),
                  close_timeout=TIMEOUT)
        self.log.append(f"Ring({kw})")
        return Ring(**kw)

    def new_file(self):
        rng = self.rng
        size = rng.choice([0, 1, 100, 4095, 4096, 4097, 8191, 65537, rng.randint(2, 300_000),
                           rng.randint(2, 300_000), rng.randint(MIB, 4 * MIB + 4097)])
        self.files += 1
        path = self.tmp / f"f{self.files}"
        content = rng.randbytes(size)
        path.write_bytes(content)
        f = File(path, content)
        self.step_files.append(f)
        return f

    def pick_file(self):
        shareable = [f for f in self.step_files if f.mutated is None and f.jobs]
        if shareable and self.rng.random() < 0.3:
            return self.rng.choice(shareable)
        return self.new_file()

    def file_arg(self, f):
        """The file as the caller passes it: a path, an fd or a file object."""
        how = self.rng.choice(["path", "str", "fd", "object"])
        if how == "path":
            return f.path
        if how == "str":
            return str(f.path)
        if how == "fd":
            fd = os.open(f.path, os.O_RDONLY)
            f.handles.append(fd)
            return fd
        obj = open(f.path, "rb", buffering=0)
        f.handles.append(obj)
        return obj

    def range_for(self, size):
        rng = self.rng
        r = rng.random()
        if r < 0.4 or size == 0:
            offset = 0
        elif r < 0.55:
            offset = rng.randrange(0, size + 1, 4096) if size >= 4096 else 0
        elif r < 0.6:
            offset = size
        else:
            offset = rng.randint(0, size)
        r = rng.random()
        if r < 0.4:
            count = None
        elif r < 0.45:
            count = 0
        elif r < 0.8:
            count = rng.randint(0, size - offset)
        else:
            count = size - offset + rng.randint(1, MIB)  # past EOF: a short transfer
        return offset, count

    def connection(self):
        """(client, peer socket, is_unix)."""
        rng = self.rng
        if rng.random() < 0.25:
            a, b = unix_pair()
            return a, b, True
        # No tiny SO_RCVBUF: with one, a loopback receiver's window can stay below the sender's
        # MSS after zero-copy sends and the connection crawls (a TCP matter, not uringsend's).
        a, b = tcp_pair(rcvbuf=rng.choice([None, None, 65536]))
        if rng.random() < 0.2:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return a, b, False

    def peer_for(self, sock, total):
        """A peer that reads at once, or stops (at the start or part-way) until its gate opens;
        sometimes one that resets the connection after some bytes."""
        rng = self.rng
        gate = hold_at = None
        if rng.random() < 0.4:
            gate = threading.Event()
            hold_at = rng.choice([0, rng.randint(0, total)])
        reset_after = None
        if rng.random() < 0.12:
            reset_after = rng.choice([0, rng.randint(0, total + 1)])
        return Peer(sock, gate, hold_at or 0, reset_after), gate

    def start_sendfile(self):
        rng = self.rng
        f = self.pick_file()
        offset, count = self.range_for(len(f.content))
        header = b"" if rng.random() < 0.5 else rng.randbytes(rng.choice([1, 17, 4096, 4097, 70_000]))
        client, psock, unix = self.connection()
        planned = min(len(f.content) - offset, count if count is not None else 1 << 62)
        peer, gate = self.peer_for(psock, len(header) + planned)
        job = Job("sendfile", f, offset, count, header, client, peer, gate, unix)
        self.jobs.append(job)
        f.jobs.append(job)
        mode = rng.choice(MODES)
        kw = {"mode": mode}
        if header or rng.random() < 0.5:
            kw["header"] = header
        if rng.random() < 0.5:
            job.callback = []
            kw["on_release"] = job.callback.append
        args = [client, self.file_arg(f)]
        if offset or count is not None or rng.random() < 0.5:
            args.append(offset)
            if count is not None:
                args.append(count)
        job.t = self.ring.sendfile(*args, **kw)
        if mode != "auto":
            assert job.t.mode == mode, (mode, job.t.mode)
        assert job.t.mode in ("splice", "zerocopy", "mmap", "copy"), job.t.mode
        self.log.append(f"sendfile #{len(self.jobs) - 1}: {mode} -> {job.describe()}")

    def start_tee(self):
        rng = self.rng
        f = self.pick_file()
        offset, count = self.range_for(len(f.content))
        planned = min(len(f.content) - offset, count if count is not None else 1 << 62)
        group = []
        for _ in range(rng.randint(1, 3)):
            client, psock, unix = self.connection()
            peer, gate = self.peer_for(psock, planned)
            group.append(Job("tee", f, offset, count, b"", client, peer, gate, unix))
        kw = {}
        if offset or count is not None:
            kw["offset"] = offset
        if count is not None:
            kw["count"] = count
        ts = self.ring.tee([j.client for j in group], self.file_arg(f), **kw)
        assert len(ts) == len(group)
        for j, t in zip(group, ts):
            j.t = t
            j.group = group
            self.jobs.append(j)
            f.jobs.append(j)
            self.log.append(f"tee #{len(self.jobs) - 1}: {j.describe()}")

    def start(self):
        if self.rng.random() < 0.12:
            self.start_tee()
        else:
            self.start_sendfile()

    # -- actions --
    def running(self):
        return [j for j in self.jobs if not j.t.done()]

    def act(self):
        rng = self.rng
        weights = {"poll": 20, "drive": 15, "start": 10, "cancel": 8, "gate": 10, "close_client": 3,
                   "close_file": 3, "wait": 4}
        if self.changeable():
            weights.update(rewrite=12, truncate=8, replace=2)
        action = rng.choices(list(weights), list(weights.values()))[0]
        getattr(self, "do_" + action)()
        self.check_running()

    def do_poll(self):
        n = 0
        for _ in range(self.rng.randint(1, 20)):
            handled = self.ring.poll(self.rng.choice([0, 0, 0, 0.001]))
            assert isinstance(handled, int) and handled >= 0
            n += handled
        self.log.append(f"poll: {n} completions")

    def do_drive(self):
        """Poll until some transfer reports something new (at most ~0.1 s: all may be stalled)."""
        before = sum(len(j.t.events) for j in self.jobs)
        for i in range(50):
            self.ring.poll(0.002)
            if sum(len(j.t.events) for j in self.jobs) > before:
                break
        self.log.append(f"drive: {i + 1} polls")

    def do_start(self):
        self.start()

    def do_cancel(self):
        jobs = self.running()
        if not jobs:
            return
        j = self.rng.choice(jobs)
        j.cancelled = True
        j.t.cancel()
        self.log.append(f"cancel #{self.jobs.index(j)}")

    def do_gate(self):
        gated = [j for j in self.jobs if j.gate is not None and not j.gate.is_set()]
        if gated:
            j = self.rng.choice(gated)
            j.gate.set()
            self.log.append(f"peer of #{self.jobs.index(j)} starts reading")

    def changeable(self):
        """Files read by exactly one transfer (or one tee group) that has not settled yet (bytes
        may still be on their way), and not changed yet."""
        out = []
        for f in self.step_files:
            if f.mutated is None and f.jobs and len({id(j.group or j) for j in f.jobs}) == 1:
                if any(not j.t.settled() for j in f.jobs) and f.content:
                    out.append(f)
        return out

    def _note_strict(self, f):
        for j in f.jobs:
            if j.stable:
                j.strict = j.released_ranges()

    def do_rewrite(self):
        """Overwrite parts of the file in place: the released ranges of a stable transfer (which
        must reach the peer unchanged), or any range (each byte old or new)."""
        files = self.changeable()
        if not files:
            return
        rng = self.rng
        # most interesting: a stable transfer part-way, with ranges already released, best while
        # its peer is held back (its other bytes wait in the socket, the pages still referenced)
        partway = [f for f in files if f.jobs[0].stable and f.jobs[0].released_ranges()]
        held = [f for f in partway if f.jobs[0].gate is not None and not f.jobs[0].gate.is_set()]
        if held and rng.random() < 0.7:
            f = rng.choice(held)
        else:
            f = rng.choice(partway if partway and rng.random() < 0.7 else files)
        self._note_strict(f)
        j = f.jobs[0]
        size = len(f.content)
        if j.stable and j.strict and rng.random() < 0.6:
            ranges = list(j.strict)
            what = "released ranges"
        else:
            lo = rng.randint(0, size - 1)
            hi = rng.randint(lo + 1, min(size, lo + rng.choice([1, 4096, 65536, 2 * MIB])))
            ranges = [(lo, hi)]
            what = "a range"
        fd = os.open(f.path, os.O_WRONLY)
        try:
            for a, b in ranges:
                new = rng.randbytes(b - a)
                assert os.pwrite(fd, new, a) == b - a
                f.changes.append((a, b, new))
        finally:
            os.close(fd)
        f.mutated = "rewrite"
        self.log.append(f"rewrite {what} {ranges} of f{f.path.name} (strict {j.strict})")

    def do_truncate(self):
        files = self.changeable()
        if not files:
            return
        rng = self.rng
        f = rng.choice(files)
        self._note_strict(f)
        j = f.jobs[0]
        size = len(f.content)
        choices = [0, rng.randint(0, size - 1), rng.randint(0, size - 1) // 4096 * 4096]
        if j.offset < size:
            choices += [j.offset, rng.randint(j.offset, size - 1)]
        new_size = rng.choice(choices)
        os.truncate(f.path, new_size)
        f.truncated_to = new_size
        f.changes.append((new_size, size, bytes(size - new_size)))  # a page's tail reads as zeros
        f.mutated = "truncate"
        self.log.append(f"truncate f{f.path.name} {size} -> {new_size}")

    def do_replace(self):
        """A new file renamed over the path: transfers already hold the old one."""
        files = self.changeable()
        if not files:
            return
        f = self.rng.choice(files)
        tmp = f.path.with_name(f.path.name + ".new")
        tmp.write_bytes(self.rng.randbytes(len(f.content)))
        os.replace(tmp, f.path)
        f.mutated = "replace"
        self.log.append(f"replace f{f.path.name}")

    def do_close_client(self):
        """The caller closes its socket mid-transfer: the transfer goes on with its own."""
        jobs = [j for j in self.running() if not j.client_closed]
        if jobs:
            j = self.rng.choice(jobs)
            j.client.close()
            j.client_closed = True
            self.log.append(f"caller closes the socket of #{self.jobs.index(j)}")

    def do_close_file(self):
        files = [f for f in self.step_files if f.handles]
        if files:
            f = self.rng.choice(files)
            h = f.handles.pop(0)
            os.close(h) if isinstance(h, int) else h.close()
            self.log.append(f"caller closes its handle of f{f.path.name}")

    def do_wait(self):
        """Wait for one transfer (only when no peer is held back: buffers, budget and a tee's
        chain are shared, so a stalled peer could hold this one up)."""
        if any(j.gate is not None and not j.gate.is_set() for j in self.jobs):
            return
        jobs = self.running()
        if not jobs:
            return
        j = self.rng.choice(jobs)
        released = j.stable and self.rng.random() < 0.5
        try:
            if released:
                j.t.released(TIMEOUT)
            else:
                j.t.result(TIMEOUT)
        except TimeoutError:
            raise
        except OSError:
            pass  # the outcome is checked with the others at the end of the step
        assert j.t.done() and (j.t.settled() or not released)
        self.log.append(f"wait{'_released' if released else ''} #{self.jobs.index(j)}")

    def check_running(self):
        """Invariants that hold at any time."""
        for j in self.jobs:
            t = j.t
            assert t.sent >= j.last[0] and t.header_sent >= j.last[1], (j.last, t.sent, t.header_sent)
            j.last = (t.sent, t.header_sent)
            assert not t.settled() or t.done()
            assert 0 <= t.sent <= max(j.planned, 0) and 0 <= t.header_sent <= len(j.header)
            if j.stable:
                assert sum(b - a for a, b in j.released_ranges()) <= t.sent + t.header_sent
        st = self.ring.statistics()
        assert 0 <= st.buffers_free <= st.buffers_total, st
        assert st.zc_bytes_unreleased >= 0 and st.pending_notifs >= 0, st

    # -- a step --
    def step(self, index):
        rng = self.rng
        self.jobs = []
        self.step_files = []
        self.log = [f"seed {self.seed} step {index}"]
        if self.ring is None:
            self.ring = self.new_ring()
        for _ in range(rng.randint(1, 4)):
            self.start()
        for _ in range(rng.randint(0, 10)):
            self.act()
        for j in self.jobs:
            if j.gate is not None:
                j.gate.set()
        closing = rng.random() < 0.25
        if closing:
            for j in self.jobs:
                j.closed_running = not j.t.done()
            self.log.append(f"close the ring with {sum(j.closed_running for j in self.jobs)} running")
            self.close_ring()
        else:
            self.settle()
        for j in self.jobs:
            if not j.client_closed:
                j.client.close()
                j.client_closed = True
        self.await_peers()
        for j in self.jobs:
            try:
                got = j.peer.join()
            except BaseException as exc:
                raise AssertionError(f"#{self.jobs.index(j)} {j.describe()}: {exc!r}") from exc
            t = j.t
            self.tally[f"{j.kind}:{t.mode}"] += 1
            self.tally["bytes"] += len(got)
            self.tally["error " + (errno.errorcode.get(t.error.errno, "?") if t.error else "none")] += 1
            self.tally["peer reset"] += j.peer.reset
            self.tally["cancelled running"] += j.cancelled
            self.tally["closed running"] += j.closed_running
            self.tally[f"file {j.file.mutated}"] += 1
            self.tally["short"] += bool(t.short)
            self.tally["strict bytes"] += sum(b - a for a, b in j.strict)
            try:
                self.check_job(j, got)
            except AssertionError as exc:
                raise AssertionError(f"#{self.jobs.index(j)} {j.describe()}: {exc}") from None
        self.cleanup_files()
        if not closing:
            self.check_idle()
            if rng.random() < 0.15:
                self.log.append("close the idle ring")
                self.close_ring()
                self.check_fds()

    def settle(self):
        """Wait for every transfer of the step to settle, one of the ways the API offers."""
        rng = self.rng
        ts = [j.t for j in self.jobs]
        how = rng.choice(["ring.wait", "run_until_complete", "each"])
        self.log.append(f"settle: {how}")
        if how == "ring.wait":
            self.ring.wait(ts, TIMEOUT)
            assert all(t.done() for t in ts)
            self.ring.wait(ts, TIMEOUT, released=True)
        elif how == "run_until_complete":
            self.ring.run_until_complete(TIMEOUT)
        else:
            for j in rng.sample(self.jobs, len(self.jobs)):
                try:
                    j.t.released(TIMEOUT) if j.stable else j.t.result(TIMEOUT)
                except TimeoutError:
                    raise
                except OSError:
                    pass  # checked below
                assert j.t.done() and (j.t.settled() or not j.stable)
            self.ring.wait(ts, TIMEOUT, released=True)
        assert all(t.settled() for t in ts)

    def await_peers(self):
        """Wait for every peer to see EOF, driving the ring meanwhile. With DEFER_TASKRUN the
        kernel can drop a request's last reference to a socket in task work that only the ring's
        next GETEVENTS runs, after the transfer settled: until then the connection stays open
        (seen for tee under ASan, where timing differs)."""
        deadline = time.monotonic() + TIMEOUT
        for j in self.jobs:
            while j.peer.thread.is_alive() and time.monotonic() < deadline:
                if self.ring is None:
                    j.peer.thread.join(max(0, deadline - time.monotonic()))
                else:
                    self.ring.poll(0.005)

    def close_ring(self):
        ring, self.ring = self.ring, None
        ring.close()
        st = ring.statistics()
        assert st.kept_alive == 0, st
        assert st.transfers_active == 0, st
        for j in self.jobs:
            assert j.t.done() and j.t.settled(), j.describe()

    def check_fds(self):
        """With no ring open and every socket and file of the steps closed, no fd is left."""
        now = self.proc.num_fds()
        if now != self.fds:
            links = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    links[fd] = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    pass
            raise AssertionError(f"{now} fds open after the ring closed, {self.fds} before: {links}")

    def check_idle(self):
        st = self.ring.statistics()
        assert st.buffers_free == st.buffers_total, st
        assert st.zc_bytes_unreleased == 0, st
        assert st.pending_notifs == 0, st
        assert st.transfers_active == 0, st
        assert st.mappings_busy == 0, st
        assert st.kept_alive == 0, st

    def cleanup_files(self):
        for f in self.step_files:
            for h in f.handles:
                os.close(h) if isinstance(h, int) else h.close()
            f.handles = []
            f.path.unlink()
        if self.ring is None:
            self.check_fds()

    # -- the checks of one transfer --
    def check_job(self, j, got):
        t = j.t
        assert t.done() and t.settled()
        hs, sent = t.header_sent, t.sent
        assert 0 <= sent <= j.planned
        assert 0 <= hs <= len(j.header)
        if hs < len(j.header):
            assert sent == 0, "file bytes sent before the whole header"
        self.check_outcome(j)
        self.check_events(j)
        # the peer's bytes
        if j.peer.reset:
            assert len(got) <= hs + sent, f"the peer got {len(got)} bytes of {hs} + {sent} sent"
        else:
            assert len(got) == hs + sent, f"the peer got {len(got)} bytes, {hs} + {sent} were sent"
        head = got[:hs]
        i = first_difference(head, j.header[:len(head)])
        assert i < 0, f"header byte {i} differs"
        self.check_body(j, got[hs:])
        # the transfer's own view of its result
        if self.ring is not None and j.kind == "sendfile":
            if t.error is None:
                assert t.result(0) == sent
            else:
                with pytest.raises(OSError) as info:
                    t.result(0)
                assert type(info.value) is type(t.error) and info.value.errno == t.error.errno
            if t.mode == "splice":
                with pytest.raises(ReleaseNotReported):
                    t.released(0)
            elif t.error is None:
                assert t.released(0) == sent

    def check_outcome(self, j):
        t, f = j.t, j.file
        err = t.error
        allowed = set()
        if j.cancelled or j.closed_running:
            allowed.add(errno.ECANCELED)
        if j.peer.reset:
            allowed |= {errno.ECONNRESET, errno.EPIPE}
        if f.truncated_to is not None and j.kind == "sendfile" and t.mode in ("copy", "mmap"):
            allowed.add(errno.EFAULT)  # the zero-filled tail of a page cut mid-page went out
        if err is not None:
            assert isinstance(err, OSError) and err.errno in allowed, f"unexpected {err!r}"
            if err.errno == errno.ECANCELED:
                assert isinstance(err, TransferCancelled)
            if err.errno == errno.EFAULT:
                assert j.offset + t.sent > f.truncated_to, "EFAULT, yet nothing past the new end was sent"
            return
        # success: everything, or (file truncated) up to at least the new end
        assert t.header_sent == len(j.header)
        if f.truncated_to is None or t.sent == j.planned:
            assert t.sent == j.planned, "ended without error before the end"
        else:
            assert j.offset + t.sent >= f.truncated_to, "stopped before the file's new end"
            assert t.short
        if t.sent == j.planned and j.count is not None and j.count > j.planned:
            assert t.short, "a count past EOF is a short transfer"

    def check_events(self, j):
        t = j.t
        events = list(t.events)
        last_ns = None
        for e in events:
            assert e.kind in (SENT, RELEASED, QUEUED), e
            assert e.nbytes > 0, e
            if last_ns is not None:
                assert e.t_ns >= last_ns, "events out of time order"
            last_ns = e.t_ns
        body = [e for e in events if e.offset is not None]
        head = [e for e in events if e.offset is None]
        if j.kind == "tee" or t.mode == "splice":
            assert {e.kind for e in body} <= {QUEUED}, "a mapping mode reports only 'queued'"
            flowing = [e for e in body if e.kind == QUEUED]
            if j.kind == "tee":
                assert not head
            else:
                moved = [sum(e.nbytes for e in head if e.kind == k) for k in (SENT, QUEUED)]
                assert t.header_sent in moved and 0 in moved, head
                assert sum(e.nbytes for e in head if e.kind == RELEASED) in (0, t.header_sent), head
        else:
            assert {e.kind for e in body} <= {SENT, RELEASED}
            flowing = [e for e in body if e.kind == SENT]
            assert {e.kind for e in head} <= {SENT, RELEASED}, head
            assert sum(e.nbytes for e in head if e.kind == SENT) == t.header_sent
            assert sum(e.nbytes for e in head if e.kind == RELEASED) == t.header_sent, \
                "the header's buffer released exactly once"
        # bytes flowed in order: each chunk starts where the previous one ended
        pos = j.offset
        for e in flowing:
            assert e.offset == pos, f"chunk at {e.offset}, expected {pos}: {flowing}"
            pos += e.nbytes
        assert pos == j.offset + t.sent, f"chunks sum to {pos - j.offset}, sent is {t.sent}"
        if not j.stable:
            return
        # every byte sent released exactly once, and only after it was sent
        released = []
        reach = j.offset
        for e in body:
            if e.kind == SENT:
                reach = e.offset + e.nbytes
            else:
                assert e.offset + e.nbytes <= reach, f"released {e} before it was sent (sent up to {reach})"
                assert e.copied in (True, False), e
                # loopback copies what it delivers (not what a reset discards, nor pages that a
                # truncation took away under the send)
                if not j.unix and not j.peer.reset and j.file.truncated_to is None:
                    assert e.copied, f"loopback copies: {e}"
                released.append((e.offset, e.offset + e.nbytes))
        pos = j.offset
        for a, b in sorted(released):
            assert a == pos, f"released ranges overlap or leave a gap at {pos}: {sorted(released)}"
            pos = b
        assert pos == j.offset + t.sent, f"released up to {pos}, sent up to {j.offset + t.sent}"
        if j.callback is not None:
            assert [e for e in j.callback if e.offset is not None] == [e for e in body if e.kind == RELEASED]
            assert all(e.kind == RELEASED for e in j.callback)
        if j.unix and t.mode in ("zerocopy", "mmap") and t.sent:
            assert t.fallback, "a zero-copy mode on a UNIX socket says it fell back"

    def check_body(self, j, body):
        f = j.file
        start = j.offset
        want = f.content[start:start + len(body)]
        if body == want:
            return
        # where the file changed under the transfer (outside its strict ranges): old or new bytes
        end = start + len(body)
        flex = [(max(a, start), min(b, end), alt[max(a, start) - a:min(b, end) - a])
                for a, b, alt in f.changes if a < end and b > start]
        flex = [(a, b, alt) for a, b, alt in flex if a < b]
        pieces = []
        for a, b, alt in flex:
            for p in subtract([(a, b)], j.strict):
                pieces.append((p[0], p[1], alt[p[0] - a:p[1] - a]))
        pos = start
        for a, b, alt in sorted(pieces):
            i = first_difference(body[pos - start:a - start], f.content[pos:a])
            assert i < 0, self._diff(j, body, pos + i)
            i = first_neither(body[a - start:b - start], f.content[a:b], alt)
            assert i < 0, self._diff(j, body, a + i, alt[i])
            pos = b
        i = first_difference(body[pos - start:], f.content[pos:end])
        assert i < 0, self._diff(j, body, pos + i)

    def _diff(self, j, body, at, alt=None):
        rel = at - j.offset
        return (f"file byte {at} (body byte {rel}) is {body[rel]:#04x}, the file had {j.file.content[at]:#04x}"
                f"{'' if alt is None else f' and then {alt:#04x}'}; strict ranges {j.strict}; "
                f"changes {[(a, b) for a, b, _ in j.file.changes]}")

    # -- driver --
    def run(self):
        try:
            for index in range(self.steps):
                try:
                    self.step(index)
                except BaseException as exc:
                    raise AssertionError(f"seed {self.seed}, step {index}: {exc!r}\n{self.report()}") from exc
            if self.ring is not None:
                self.close_ring()
            self.check_fds()
            print(f"seed {self.seed}: {self.steps} steps, {dict(sorted(self.tally.items()))}")
        finally:
            self.abandon()

    def report(self):
        """The step's actions, then every transfer's and the ring's state now."""
        lines = ["actions:"] + self.log + ["transfers now:"]
        lines += [f"#{i} {j.describe()}" for i, j in enumerate(self.jobs) if j.t is not None]
        if self.ring is not None:
            try:
                lines.append(f"ring statistics: {self.ring.statistics()}")
            except Exception as exc:  # the report must not hide the failure
                lines.append(f"ring statistics: {exc!r}")
        return "\n  ".join(lines)

    def abandon(self):
        """After a failure: let every thread and fd go, so the failure is reported alone."""
        for j in self.jobs:
            if j.gate is not None:
                j.gate.set()
            if not j.client_closed:
                j.client.close()
                j.client_closed = True
        if self.ring is not None:
            try:
                self.ring.close()
            except Exception:
                pass
            self.ring = None
        for j in self.jobs:
            j.peer.thread.join(TIMEOUT)
            if not j.peer.reset:
                j.peer.sock.close()
        for f in self.step_files:
            for h in f.handles:
                os.close(h) if isinstance(h, int) else h.close()
            f.handles = []


@pytest.mark.parametrize("seed", _seeds())
def test_stress(seed, tmp_path):
    Stress(seed, STEPS, tmp_path).run()


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_stress_long(seed, tmp_path):
    Stress(seed, SLOW_STEPS, tmp_path).run()
