"""Fault-injection helpers for the reliability tests.

- ``run_child``: run a test module's function in a fresh interpreter, so a test can change what
  cannot be undone in-process (seccomp filter, uid, rlimits, SIGPIPE disposition) and observe a
  death by signal as a return code.
- ``block_io_uring``: a seccomp filter failing io_uring_setup with an errno, as container runtimes do.
- ``drop_to_nobody``: become an unprivileged user (no CAP_IPC_LOCK, no CAP_SYS_RESOURCE).
- ``small_buffers``: a sender that stalls soon when its peer does not read.
- ``small_ring`` and ``assert_clean``: a ring that stalls soon, and the check that it gave back
  every op, notification, buffer and pipe.
"""
import ctypes
import json
import os
import platform
import pwd
import socket
import subprocess
import sys

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


def small_buffers(sender, size=4096):
    """Shrink a sender's SO_SNDBUF so that a peer that does not read stalls it quickly."""
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


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
