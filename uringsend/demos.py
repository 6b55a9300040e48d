"""Demos: small real transfers over loopback TCP that show what the kernel reports.

Each demo is a function returning a JSON-ready dict with the demo's own ``checks`` and an ``ok``
verdict; ``uringsend.cli`` only formats them. Every demo makes its own file in a temporary directory
and reads the other end of the connection in a thread, so all of them run with no arguments.
"""
import contextlib
import os
import socket
import tempfile
import threading

from . import _lowlevel as ll
from .ring import Ring
from .transfer import QUEUED, RELEASED, SENT

_F_MORE = ll.IORING_CQE_F_MORE
_F_NOTIF = ll.IORING_CQE_F_NOTIF
_REPORT_USAGE = ll.IORING_SEND_ZC_REPORT_USAGE
_ZC_COPIED = ll.IORING_NOTIF_USAGE_ZC_COPIED
_INVERT = bytes(255 - i for i in range(256))  # a table making every byte differ from the original

SLOW_RCVBUF = 16 << 10      # the slow reader's SO_RCVBUF: little room, so the sender waits on it
SLOW_PIECE = 16 << 10       # ... and it reads this much at a time,
SLOW_RATE = 32 << 20        # ... at about this many bytes per second


class Reader:
    """Reads a socket in a thread until EOF. ``gate``: an Event to wait for before the first read.
    ``pause``: seconds to idle after each read of ``piece`` bytes (a deliberately slow peer)."""

    def __init__(self, sock, gate=None, piece=1 << 20, pause=0.0):
        self.sock = sock
        self.gate = gate
        self.piece = piece
        self.pause = pause
        self.data = bytearray()
        self.first_recv = 0
        self.error = None
        self.hurry = threading.Event()  # set on teardown: stop pausing
        self.thread = threading.Thread(target=self._run, name="uringsend-demo-reader", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            if self.gate is not None:
                self.gate.wait()
            while True:
                chunk = self.sock.recv(self.piece)
                if not chunk:
                    return
                if not self.data:
                    self.first_recv = len(chunk)
                self.data += chunk
                if self.pause:
                    self.hurry.wait(self.pause)
        except OSError as exc:
            self.error = exc

    def join(self, timeout):
        """The bytes read up to EOF; TimeoutError when EOF does not come in time."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the reader saw no EOF within {timeout} s ({len(self.data)} bytes read)")
        if self.error is not None:
            raise self.error
        return bytes(self.data)


class Link:
    """A loopback TCP connection: ``client`` (the sender's end) and a ``reader`` on the other end."""

    def __init__(self, client, peer, reader):
        self.client = client
        self.peer = peer
        self.reader = reader


@contextlib.contextmanager
def loopback(rcvbuf=None, sndbuf=None, gate=None, piece=1 << 20, pause=0.0):
    """A Link over 127.0.0.1; the Reader's arguments are passed on. Closes both ends on exit."""
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        if rcvbuf:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before accept: sets the window
        client = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
    finally:
        srv.close()
    if sndbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    reader = Reader(peer, gate, piece, pause)
    try:
        yield Link(client, peer, reader)
    finally:
        reader.hurry.set()
        if gate is not None:
            gate.set()
        for s in (client, peer):
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv()
            except OSError:
                pass
        reader.thread.join(5)
        client.close()
        peer.close()


@contextlib.contextmanager
def datafile(size):
    """(path, bytes): a file of ``size`` random bytes in a fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="uringsend-demo-") as d:
        path = os.path.join(d, "data.bin")
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        yield path, data


def _us(t_ns, start_ns):
    return round((t_ns - start_ns) / 1000, 1)


def _event_rows(t):
    return [{"t_us": _us(e.t_ns, t.started_ns), "kind": e.kind, "offset": e.offset, "nbytes": e.nbytes,
             "copied": e.copied} for e in t.events]


def _check(name, passed, detail=""):
    return {"name": name, "ok": bool(passed), "detail": detail}


def _finish(result):
    result["ok"] = all(c["ok"] for c in result["checks"])
    return result


def _settle(t, link, timeout):
    """End the stream and wait for every release the mode reports; returns the peer's bytes."""
    t.result(timeout)
    link.client.shutdown(socket.SHUT_WR)
    if t.mode != "splice":
        t.released(timeout)
    return link.reader.join(timeout)


# ---- notify ------------------------------------------------------------------------------------
def _timeline(ring, t):
    """One row per CQE the ring handled (``Ring.trace()``), for a ring that ran transfer ``t``.

    The trace names each CQE's op and role but not the file offset of its chunk; that comes from
    the transfer's timeline, which records one event per send that moved bytes, in the order the
    CQEs were handled: a send's offset is its event's, a fill's is that of the send linked right
    behind it, a notification's is its send's."""
    trace = ring.trace()
    body = iter([e for e in t.events if e.offset is not None and e.kind in (SENT, QUEUED)])
    offset = {}  # user_data -> file offset of the chunk
    for i, e in enumerate(trace):
        if e.transfer is t and e.role == "send" and not e.notif and e.res > 0:
            ev = next(body, None)
            if ev is None:
                break
            offset[e.user_data] = ev.offset
            prev = trace[i - 1] if i else None
            if prev is not None and prev.transfer is t and prev.role == "fill" and prev.res == ev.nbytes:
                offset[prev.user_data] = ev.offset
    return [_cqe_row(e, offset.get(e.user_data), t.started_ns) for e in trace]


def _cqe_row(e, offset, start_ns):
    """``e``: a ``TraceEntry``; ``offset``: its chunk's file offset, when known."""
    row = {"t_us": _us(e.t_ns, start_ns), "op": e.op, "role": e.role, "user_data": e.user_data,
           "res": e.res, "flags": e.flags,
           "flags_decoded": [n for n, bit in (("MORE", _F_MORE), ("NOTIF", _F_NOTIF)) if e.flags & bit],
           "offset": offset, "len": e.len, "copied": None}
    if e.role == "none":
        row["note"] = "no operation has this user_data"
    elif e.notif:
        if e.role != "raw":  # the engine asks every SEND_ZC for IORING_SEND_ZC_REPORT_USAGE
            row["copied"] = bool(e.res & _ZC_COPIED)  # a flag word, not an errno
            row["note"] = "released: copied" if row["copied"] else "released: zero-copy"
        else:
            row["note"] = "released"
    elif e.res < 0:
        row["note"] = f"error: {os.strerror(-e.res)}"
    elif e.role == "install":
        row["note"] = ("socket and file put in the ring's registered file table" if e.res == 2
                       else "socket put in the ring's registered file table")
    elif e.role == "unslot":
        row["note"] = "registered file slots emptied: the transfer holds the socket no more"
    elif e.role == "poll":
        row["note"] = "socket writable again"
    elif e.role == "fill":
        row["note"] = "file -> pipe" if e.op == "SPLICE" else "file -> buffer"
    elif e.role in ("send", "header"):
        what = "header" if e.role == "header" else "pipe -> socket" if e.op == "SPLICE" else "sent"
        if e.op == "SPLICE":
            row["note"] = f"{what}: queued by reference, no release will follow"
        elif e.flags & _F_MORE:
            row["note"] = f"{what}, notification to follow"
        else:
            row["note"] = f"{what} and released (copied into the socket)"
    else:
        row["note"] = e.role or ""
    return row


NOTIFY_CHUNK = 256 << 10


def notify(mode="mmap", size=4 << 20, slow_reader=False, timeout=30.0, progress=None):
    """One transfer's timeline, one row per CQE, and a summary of its sent and released chunks."""
    pace = dict(rcvbuf=SLOW_RCVBUF, piece=SLOW_PIECE, pause=SLOW_PIECE / SLOW_RATE) if slow_reader else {}
    on_release = None
    if progress is not None:
        def report(ev):
            progress(f"notify: {t.released_bytes()} of {size} bytes released")
        on_release = report
    with datafile(size) as (path, data), loopback(**pace) as link:
        # 256 KiB chunks: several releases even for a small file, so the timeline shows them
        with Ring(trace=True, chunk_size=NOTIFY_CHUNK, copy_chunk_size=NOTIFY_CHUNK) as ring:
            t = ring.sendfile(link.client, path, mode=mode, on_release=on_release)
            got = _settle(t, link, timeout)
            timeline = _timeline(ring, t)
    sent_at, released_at = {}, {}
    for e in t.events:
        if e.offset is None:
            continue
        if e.kind in (SENT, QUEUED):
            sent_at.setdefault(e.offset, e.t_ns)
        elif e.kind == RELEASED:
            released_at[e.offset] = e.t_ns
    releases = [e for e in t.events if e.kind == RELEASED and e.offset is not None]
    gaps = [released_at[o] - sent_at[o] for o in sent_at if o in released_at]
    summary = {
        "bytes": t.sent,
        "chunks": len(sent_at),
        "notifications": sum(1 for r in timeline if "NOTIF" in r["flags_decoded"]),
        "copied": sum(1 for e in releases if e.copied),
        "zerocopy": sum(1 for e in releases if e.copied is False),
        "released_bytes": t.released_bytes(),
        "max_gap_us": round(max(gaps) / 1000, 1) if gaps else None,
        "peer_first_recv": link.reader.first_recv,
    }
    checks = [_check("peer got the file, byte for byte", got == data, f"{len(got)} of {size} bytes"),
              _check("bytes sent == file size", t.sent == size, f"{t.sent} sent")]
    if t.mode == "splice":
        checks.append(_check("splice reports queued, never released", not releases and len(sent_at) > 0,
                             f"{len(sent_at)} queued"))
    else:
        late = [o for o in sent_at if o not in released_at or released_at[o] < sent_at[o]]
        checks.append(_check("every chunk sent, then released",
                             not late and summary["released_bytes"] == size,
                             f"{len(sent_at) - len(late)} of {len(sent_at)} chunks"))
    reader = {"rcvbuf": SLOW_RCVBUF, "piece": SLOW_PIECE, "rate": SLOW_RATE} if slow_reader else None
    return _finish({"demo": "notify", "requested_mode": mode, "mode": t.mode, "size": size,
                    "slow_reader": slow_reader,
                    "reader": reader, "timeline": timeline, "events": _event_rows(t),
                    "summary": summary, "checks": checks})


# ---- hazard ------------------------------------------------------------------------------------
HAZARD_CASES = (
    # mode, wait for released() before writing, expected to show the hazard
    ("splice", False, True),
    ("zerocopy", False, False),
    ("mmap", True, False),
    ("mmap", False, True),
)


def _count_changed(got, old, new):
    """(bytes equal to the new content, bytes equal to neither old nor new)."""
    changed = other = 0
    step = 4096
    for i in range(0, len(got), step):
        g, o, n = got[i:i + step], old[i:i + step], new[i:i + step]
        if g == o:
            continue
        if g == n:
            changed += len(g)
            continue
        for a, b, c in zip(g, o, n):
            changed += a == c and a != b
            other += a != b and a != c
    return changed, other


def _hazard_case(mode, after_release, expect_hazard, size, timeout):
    # A 4 KiB receive window and a gated reader keep nearly every byte in the sender's queue;
    # the send buffer is made big enough that the whole file fits there, so result() returns.
    gate = threading.Event()
    with datafile(size) as (path, old), loopback(rcvbuf=4096, sndbuf=4 * size, gate=gate) as link:
        new = old.translate(_INVERT)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with Ring() as ring:
                t = ring.sendfile(link.client, fd, mode=mode)
                sent = t.result(timeout)  # every byte queued to the socket; the peer has read none
                if after_release:
                    # On loopback the pages are released once the data has left the sender's queue,
                    # which needs the peer to read: let it, and write only after the release.
                    gate.set()
                    t.released(timeout)
                released = None if mode == "splice" else t.released_bytes()
                peer_had = len(link.reader.data)
                os.pwrite(fd, new, 0)  # in place, same size: the same pages the send referenced
                link.client.shutdown(socket.SHUT_WR)
                gate.set()
                got = link.reader.join(timeout)
                if mode != "splice":
                    t.released(timeout)
                stats = ring.statistics()
        finally:
            os.close(fd)
    changed, other = _count_changed(got, old, new)
    when = "after released()" if after_release else "after result()"
    hazard = changed > 0
    if hazard:
        verdict = f"hazard: {changed} of {len(got)} bytes changed after the send returned"
    else:
        verdict = "stable: the peer got the original bytes"
    expected = "hazard" if expect_hazard else "stable"
    checks = [_check(f"{mode} {when}: the peer got {size} bytes, each one old or new",
                     len(got) == size and not other, f"{len(got)} bytes, {other} neither" if other else ""),
              _check(f"{mode} {when}: {expected}, as expected", hazard == expect_hazard,
                     "" if hazard == expect_hazard else verdict)]
    return {"mode": mode, "written": when, "bytes": sent, "new_bytes": changed, "expected": expected,
            "released_before_write": released, "peer_read_before_write": peer_had,
            "notifications": stats.notifs, "copied_notifications": stats.copied,
            "verdict": verdict, "checks": checks}


def hazard(size=256 << 10, timeout=30.0, progress=None):
    """The 2023 Samba problem: the file is overwritten after the send returned but before the peer
    read; count how many bytes the peer then gets from the new content, per mode."""
    rows = []
    for mode, after_release, expect in HAZARD_CASES:
        if progress is not None:
            progress(f"hazard: {mode}, {len(rows) + 1} of {len(HAZARD_CASES)}")
        rows.append(_hazard_case(mode, after_release, expect, size, timeout))
    copied = sum(r["copied_notifications"] for r in rows)
    notifs = sum(r["notifications"] for r in rows)
    note = (f"On loopback the kernel copies SEND_ZC data ({copied} of {notifs} notifications here said "
            "'copied'), which is part of why the stable rows are stable here. Mode 'zerocopy' sends a "
            "snapshot read into a registered buffer, so it is stable anywhere. Mode 'mmap' sends the "
            "file's own pages: once a range is released the kernel no longer references them and writing "
            "the file cannot change what the peer gets; before the release it can (last row).")
    return _finish({"demo": "hazard", "size": size, "rows": rows, "note": note,
                    "checks": [c for r in rows for c in r["checks"]]})


# ---- header ------------------------------------------------------------------------------------
def header(mode="mmap", size=1 << 20, timeout=30.0):
    """An HTTP-style header and a file body sent as one stream with ``headers=``."""
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    with datafile(size) as (path, data), loopback() as link:
        with Ring(trace=True) as ring:
            t = ring.sendfile(link.client, path, mode=mode, headers=head)
            got = _settle(t, link, timeout)
            timeline = _timeline(ring, t)
    events = _event_rows(t)
    header_events = [e for e in events if e["offset"] is None]
    body_sent = [e["t_us"] for e in events if e["offset"] is not None and e["kind"] in (SENT, QUEUED)]
    header_sent = [e["t_us"] for e in header_events if e["kind"] in (SENT, QUEUED)]
    in_order = bool(header_sent) and (not body_sent or max(header_sent) <= min(body_sent))
    checks = [
        _check("peer got header + file, nothing between", got == head + data,
               f"{len(got)} bytes = {len(head)} header + {len(got) - len(head)} body"),
        _check("header sent before the body", in_order, f"{t.header_sent} header bytes"),
    ]
    return _finish({"demo": "header", "mode": t.mode, "size": size, "header": head.decode(),
                    "header_len": len(head), "peer_bytes": len(got),
                    "peer_first_recv": link.reader.first_recv, "events": events, "header_events": header_events,
                    "timeline": timeline, "checks": checks})


# ---- tee ---------------------------------------------------------------------------------------
def tee(sockets=3, size=1 << 20, timeout=30.0):
    """One file to ``sockets`` connections with ``Ring.tee``: the file is spliced into a pipe once
    per chunk, TEE duplicates the pipe's page references for the other sockets."""
    with datafile(size) as (path, data), contextlib.ExitStack() as stack:
        links = [stack.enter_context(loopback()) for _ in range(sockets)]
        with Ring(trace=True) as ring:
            transfers = ring.tee([link.client for link in links], path)
            ring.wait(transfers, timeout)
            for link in links:
                link.client.shutdown(socket.SHUT_WR)
            got = [link.reader.join(timeout) for link in links]
            ring.run_until_complete(timeout)
            trace = ring.trace()
    ops = {}
    paths = {"fill": "file -> pipe", "tee": "pipe -> pipe", "send": "pipe -> socket"}
    for e in trace:
        if e.role in paths and e.res > 0:
            key = f"{e.op} {paths[e.role]}"
            count, nbytes = ops.get(key, (0, 0))
            ops[key] = (count + 1, nbytes + e.res)
    peers = [{"socket": i, "bytes": len(g), "identical": g == data, "mode": t.mode, "sent": t.sent,
              "events": len(t.events), "kinds": sorted({e.kind for e in t.events})}
             for i, (g, t) in enumerate(zip(got, transfers))]
    checks = [_check(f"peer {p['socket']} got the file, byte for byte", p["identical"],
                     f"{p['bytes']} of {size} bytes") for p in peers]
    return _finish({"demo": "tee", "size": size, "sockets": sockets, "peers": peers,
                    "ops": {k: {"cqes": c, "bytes": n} for k, (c, n) in ops.items()},
                    "file_bytes_read": ops.get("SPLICE file -> pipe", (0, 0))[1], "checks": checks})


# ---- stream: generated records through the stream writer's circular buffer ---------------------
STREAM_REGIONS = 8  # the buffer is shown as this many regions, one letter each


def _records(total, seed):
    """Generated records of odd sizes: a numbered text line, then filler, adding up to ``total``."""
    import random
    rng = random.Random(seed)
    n = 0
    left = total
    while left:
        body = f"record {n:07d} ".encode()
        size = min(left, rng.randint(len(body) + 1, 3000))
        yield (body + bytes(65 + (n + i) % 26 for i in range(size - len(body))))[:size]
        left -= size
        n += 1


def _stream_line(w, lap, copied, zerocopy, reused):
    """The buffer when the write position comes back to its start: region by region, whether the
    lap just written is still in flight (F: the kernel may read it) or released (R: free to reuse)."""
    size, released = w.size, w.released
    start = (lap - 1) * size
    regions = "".join(
        "R" if released >= start + (r + 1) * size // STREAM_REGIONS else "F" for r in range(STREAM_REGIONS))
    return {"lap": lap, "committed": w.committed, "regions": regions, "in_flight": w.committed - released,
            "released": released, "copied": copied, "zerocopy": zerocopy, "waits": w.waits,
            "reused": reused}


def _stream_run(size, total, slow, timeout, progress):
    pace = dict(rcvbuf=SLOW_RCVBUF, sndbuf=SLOW_RCVBUF, piece=SLOW_PIECE, pause=SLOW_PIECE / SLOW_RATE) \
        if slow else {}
    lines = []
    early = 0    # a region handed out while bytes of its previous lap were unreleased (must stay 0)
    reuses = 0   # reserves that landed on bytes of an earlier lap
    lap_reuses = 0
    expect = bytearray()
    with loopback(**pace) as link, Ring() as ring:
        w = ring.stream(link.client, size)
        for rec in _records(total, seed=size):
            expect += rec
            done = 0
            while done < len(rec):
                view = w.reserve(len(rec) - done, timeout)
                k = len(view)
                if w.committed + k > size:  # this place held bytes of the previous lap
                    reuses += 1
                    lap_reuses += 1
                    early += w.released < w.committed + k - size
                view[:] = rec[done:done + k]
                w.commit(k)
                done += k
                if w.committed % size == 0:
                    st = w.statistics()
                    lines.append(_stream_line(w, w.committed // size, st["copied"], st["zerocopy"], lap_reuses))
                    lap_reuses = 0
                    if progress is not None:
                        progress(f"stream: size {size}: lap {lines[-1]['lap']} [{lines[-1]['regions']}]")
        w.close(timeout)
        st = w.statistics()
        link.client.shutdown(socket.SHUT_WR)
        got = link.reader.join(timeout)
    return {"size": size, "total": total, "slow_reader": slow, "records": sum(1 for _ in _records(total, size)),
            "waits": st["waits"], "wraps": st["wrapped"], "copied": st["copied"], "zerocopy": st["zerocopy"],
            "released": st["released"], "reuses": reuses, "early_reuses": early, "lines": lines,
            "peer_ok": got == expect, "peer_bytes": len(got)}


def stream(size=64 << 10, tiny=8 << 10, total=1 << 20, timeout=30.0, progress=None):
    """Records streamed through ``Ring.stream``: once with a buffer of ``size`` and a fast reader,
    once with a ``tiny`` buffer and a slow reader, where the writer must wait for releases."""
    runs = [_stream_run(size, total, False, timeout, progress),
            _stream_run(tiny, total // 8, True, timeout, progress)]
    checks = []
    for r in runs:
        name = f"{r['size'] >> 10} KiB buffer"
        checks += [
            _check(f"{name}: peer got every record, in order", r["peer_ok"],
                   f"{r['peer_bytes']} of {r['total']} bytes"),
            _check(f"{name}: every byte released", r["released"] == r["total"], f"{r['released']} released"),
            _check(f"{name}: no region handed out before the kernel released it", r["early_reuses"] == 0,
                   f"{r['reuses']} reuses, {r['early_reuses']} early"),
        ]
    checks.append(_check("tiny buffer: the writer waited for releases instead of overwriting",
                         runs[1]["waits"] > 0, f"{runs[1]['waits']} waits"))
    return _finish({"demo": "stream", "runs": runs, "checks": checks})
