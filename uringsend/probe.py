"""What this kernel offers uringsend: io_uring availability, opcodes, setup flags, limits."""
import errno
import os
import platform
import resource
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

from . import _lowlevel as ll
from .resources import pipe_max_size

_NEEDED = {"splice": ("SPLICE",), "zerocopy": ("READ_FIXED", "SEND_ZC"), "mmap": ("SEND_ZC",),
           "copy": ("SEND",), "tee": ("TEE", "SPLICE")}


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Probe:
    """What ``probe()`` found: the kernel, whether io_uring can be used here (and why not), the
    opcodes and setup flags it accepts, which modes can run, and the limits that bound them."""

    kernel: str
    io_uring: bool
    io_uring_error: Optional[str]   # errno name when io_uring_setup fails
    io_uring_disabled_sysctl: Optional[str]
    opcodes: Tuple[str, ...]
    setup_flags: Tuple[str, ...]
    modes: Tuple[str, ...]
    pipe_max_size: int
    memlock_soft: Optional[int]     # None: unlimited
    memlock_hard: Optional[int]
    root: bool

    def __str__(self):
        return "\n".join(f"{f.name}: {', '.join(v) if isinstance(v, tuple) else v}"
                         for f in fields(self) for v in (getattr(self, f.name),))

    def asdict(self):
        return asdict(self)


def probe():
    """A ``Probe``: kernel release, io_uring availability (and why not), opcodes by name, setup
    flags accepted, which modes can run, pipe-max-size, RLIMIT_MEMLOCK."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    common = dict(
        kernel=platform.release(),
        io_uring_disabled_sysctl=_read("/proc/sys/kernel/io_uring_disabled"),
        pipe_max_size=pipe_max_size(),
        memlock_soft=None if soft == resource.RLIM_INFINITY else soft,
        memlock_hard=None if hard == resource.RLIM_INFINITY else hard,
        root=os.geteuid() == 0,
    )
    ret = ll.try_setup(4, 0)
    if ret < 0:
        return Probe(io_uring=False, io_uring_error=errno.errorcode.get(-ret, str(-ret)),
                     opcodes=(), setup_flags=(), modes=(), **common)
    names = tuple(ll.opcode_name(op) for op in ll.probe_opcodes())
    flags = []
    for name, bit in ll.SETUP_FLAGS.items():
        extra = ll.SETUP_FLAGS["SINGLE_ISSUER"] if name == "DEFER_TASKRUN" else 0
        if ll.try_setup(4, bit | extra) == 0:
            flags.append(name)
    return Probe(io_uring=True, io_uring_error=None, opcodes=names, setup_flags=tuple(flags),
                 modes=tuple(m for m, ops in _NEEDED.items() if all(o in names for o in ops)),
                 **common)
