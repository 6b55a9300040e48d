"""Fault-injection helpers for the reliability tests.

- ``run_child``: run a test module's function in a fresh interpreter, so a test can change what
  cannot be undone in-process (seccomp filter, uid, rlimits, SIGPIPE disposition) and observe a
  death by signal as a return code.
- ``block_io_uring``: a seccomp filter failing io_uring_setup with an errno, as container runtimes do.
- ``drop_to_nobody``: become an unprivileged user (no CAP_IPC_LOCK, no CAP_SYS_RESOURCE).
- ``Sink``: one thread reading many sockets to EOF.
- ``peer_reset``: make a peer socket answer with RST (SO_LINGER {1, 0}, then close).
- ``small_ring`` and ``assert_clean``: a ring that stalls soon, and the check that it gave back
  every op, notification, buffer and pipe.
"""
import ctypes
import hashlib
import json
import os
import platform
import pwd
import selectors
import socket
import struct
import subprocess
import sys
import threading

from uringsend import Ring

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_child(func, *args, timeout=90):
    """Run module-level ``func(*args)`` in a new interpreter. ``func`` returns a JSON-able value.

    Returns ``(returncode, result, stderr)``; ``result`` is None when the child did not finish
    (a negative returncode is the signal that killed it).
    """
    code = ("import json, sys\n"
            f"sys.path.insert(0, {TESTS!r})\n"
            f"from {func.__module__} import {func.__name__} as func\n"
            "result = func(*json.loads(sys.argv[1]))\n"
            "sys.stdout.write('\\n' + json.dumps(result) + '\\n')\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout, cwd=TESTS)
    lines = proc.stdout.strip().splitlines()
    result = None
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
    return proc.returncode, result, proc.stderr


# ---- seccomp ----------------------------------------------------------------------------------
NR_IO_URING_SETUP = 425  # the same number on every architecture that has io_uring
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def block_io_uring(err):
    """Make io_uring_setup fail with ``err`` in this (single-threaded) process from now on."""
    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None:
        raise RuntimeError(f"no seccomp arch constant for {platform.machine()}")
    # struct seccomp_data: int nr at offset 0, u32 arch at offset 4.
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),
        (_BPF_JEQ_K, 1, 0, arch),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
        (_BPF_LD_W_ABS, 0, 0, 0),
        (_BPF_JEQ_K, 0, 1, NR_IO_URING_SETUP),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | (err & 0xFFFF)),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
    prog = _SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


# ---- privileges -------------------------------------------------------------------------------
def drop_to_nobody():
    """setuid to 'nobody': a root process loses every capability (CAP_IPC_LOCK included)."""
    pw = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    with open("/proc/self/status") as f:
        caps = dict(line.split(":\t") for line in f if line.startswith("Cap"))
    if int(caps["CapEff"], 16):
        raise RuntimeError(f"capabilities left after setuid: {caps['CapEff'].strip()}")


def private_file(size, directory="/dev/shm"):
    """A readable file of ``size`` random bytes, already unlinked: (file object, bytes).

    Open it before dropping privileges; nothing is left on disk to clean up afterwards.
    """
    data = os.urandom(size)
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    f = os.fdopen(fd, "r+b", buffering=0)
    f.write(data)
    return f, data


# ---- sockets ----------------------------------------------------------------------------------
def peer_reset(sock):
    """Close ``sock`` so that the other end gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def small_buffers(sender, size=4096):
    """Shrink a sender's SO_SNDBUF so that a peer that does not read stalls it quickly."""
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class Sink:
    """One thread reading every socket in ``socks`` until EOF or an error.

    ``join()`` returns, per socket, its bytes (``keep=True``) or ``(nbytes, sha256 hexdigest)``.
    """

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

    def join(self, timeout=60):
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


def io_wq_threads():
    """Threads of this process that are io_uring workers (iou-wrk-*, iou-sqp-*)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("iou-"):
                    n += 1
        except FileNotFoundError:
            pass  # the thread exited while we looked
    return n


MODES = ("splice", "zerocopy", "mmap", "copy")
RELEASING = ("zerocopy", "mmap", "copy")
CHUNK = 64 << 10


def small_ring(**kw):
    """A ring whose every mode moves CHUNK bytes per op, so that a stalled peer stalls it soon."""
    kw.setdefault("buffers", 4)
    return Ring(buffer_size=CHUNK, chunk_size=CHUNK, copy_chunk_size=CHUNK, pipe_size=CHUNK, **kw)


def assert_clean(ring):
    """Everything is back: no op or notification outstanding, every buffer and pipe returned."""
    st = ring.statistics()
    assert st.transfers_active == 0, st
    assert st.pending_ops == 0, st
    assert st.pending_notifs == 0, st
    assert st.zc_bytes_unreleased == 0, st
    assert st.buffers_free == st.buffers_total, st
    assert st.orphan_cqes == 0, st
    assert len(ring.ledger) == 0, st  # no raw op in flight either
    # an idle pipe holds no stale bytes that a later transfer would send (the engine keeps every
    # pipe, tee's included; one it cannot empty is closed, never pooled)
    assert ring._core.idle_pipe_bytes() == 0, st
