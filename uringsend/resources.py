"""Resource policy: how much of the process's limits one ring may take, and what to say when a
limit is hit.

The C engine pools what it uses (pipes, the registered buffer pool, file mappings, registered
file slots) and counts what zero-copy sends pin; this module decides the sizes and budgets it runs
with, from the caller's options and the process's limits, and validates them once. ``Ring`` builds
one ``Resources`` and hands it to the engine (``apply``); nothing else sets these.
"""
import errno
import os
import resource
from dataclasses import dataclass

from . import _lowlevel as ll
from .errors import memlock_text

FILE_SLOTS = 1024      # registered file table: a transfer takes one or two slots while it runs
MAX_IDLE_PIPES = 16    # pipes kept for reuse between splice transfers
KEEP_MAPPINGS = 64     # idle file mappings cached (each keeps an fd for the truncation check)
LARGE_MAPPING = 16 << 20  # files above this get a mapping per transfer, dropped as it is released


def pipe_max_size():
    """/proc/sys/fs/pipe-max-size: the largest pipe an unprivileged F_SETPIPE_SZ may ask for."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 20


def default_zc_budget():
    """Pinned pages count against RLIMIT_MEMLOCK unless the process may lock memory (root): stay
    well under the limit (the ring's own pages count as well) so a send does not fail ENOMEM
    [KF 16]."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() == 0 or soft == resource.RLIM_INFINITY:
        return 16 << 20
    return max(16 << 10, min(16 << 20, soft // 4))


def file_slots():
    """Registered file slots: FILE_SLOTS, but never more than RLIMIT_NOFILE allows."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, min(FILE_SLOTS, soft if soft != resource.RLIM_INFINITY else FILE_SLOTS))


def _size(name, value, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, not {value!r}")
    return value


@dataclass(frozen=True)
class Resources:
    """What one ring may use. Built from ``Ring``'s options; every value checked here."""

    buffers: int
    buffer_size: int
    chunk_size: int
    copy_chunk_size: int
    pipe_size: int
    zc_budget: int
    file_slots: int

    @classmethod
    def from_options(cls, buffers, buffer_size, chunk_size, copy_chunk_size, pipe_size, zc_budget):
        for name, value in (("chunk_size", chunk_size), ("copy_chunk_size", copy_chunk_size),
                            ("buffer_size", buffer_size)):
            _size(name, value, 4096, 1 << 30)
        if not isinstance(buffers, int) or buffers < 1 or buffer_size % ll.PAGE:
            raise ValueError(f"buffers must be >= 1 and buffer_size a multiple of {ll.PAGE}")
        if pipe_size is not None:
            _size("pipe_size", pipe_size, 4096, 1 << 30)
        if zc_budget is not None:
            _size("zc_budget", zc_budget, 4096, 1 << 40)
        return cls(buffers, buffer_size, chunk_size, copy_chunk_size,
                   min(pipe_size or (1 << 20), pipe_max_size()),
                   default_zc_budget() if zc_budget is None else zc_budget, file_slots())

    def apply(self, core):
        """Configure the engine with these sizes (once, before the first transfer)."""
        core.configure(self.chunk_size, self.copy_chunk_size, self.zc_budget, self.pipe_size,
                       MAX_IDLE_PIPES, KEEP_MAPPINGS, LARGE_MAPPING)

    def register_pool(self, core):
        """Register the zero-copy buffer pool; the error says what to change when the kernel
        refuses (registered buffers count against RLIMIT_MEMLOCK)."""
        ret = core.pool(self.buffers, self.buffer_size)
        if ret >= 0:
            return
        err = -ret
        what = f"io_uring_register_buffers ({self.buffers} x {self.buffer_size} bytes): {os.strerror(err)}"
        if err != errno.ENOMEM:
            raise OSError(err, what)
        raise OSError(errno.ENOMEM, (
            f"{what}: registered buffers count against RLIMIT_MEMLOCK ({memlock_text()}); use "
            "Ring(buffers=..., buffer_size=...) to register less, or raise the limit"))
