"""What this kernel offers uringsend: io_uring availability, opcodes, setup flags, limits."""
import errno
import os
import platform
import resource

from . import _lowlevel as ll
from .pools import pipe_max_size

_NEEDED = {"splice": ("SPLICE",), "zerocopy": ("READ_FIXED", "SEND_ZC"), "mmap": ("SEND_ZC",),
           "copy": ("SEND",), "tee": ("TEE", "SPLICE")}


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def probe():
    """A dict: kernel release, io_uring availability (and why not), opcodes by name, setup flags
    accepted, which modes can run, pipe-max-size, RLIMIT_MEMLOCK."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    info = {
        "kernel": platform.release(),
        "io_uring_disabled_sysctl": _read("/proc/sys/kernel/io_uring_disabled"),
        "pipe_max_size": pipe_max_size(),
        "memlock_soft": None if soft == resource.RLIM_INFINITY else soft,
        "memlock_hard": None if hard == resource.RLIM_INFINITY else hard,
        "root": os.geteuid() == 0,
    }
    ret = ll.try_setup(4, 0)
    info["io_uring"] = ret == 0
    if ret < 0:
        info["io_uring_error"] = errno.errorcode.get(-ret, str(-ret))
        info["opcodes"] = []
        info["setup_flags"] = []
        info["modes"] = []
        return info
    names = [ll.opcode_name(op) for op in ll.probe_opcodes()]
    info["opcodes"] = names
    flags = []
    for name, bit in ll.SETUP_FLAGS.items():
        extra = ll.SETUP_FLAGS["SINGLE_ISSUER"] if name == "DEFER_TASKRUN" else 0
        if ll.try_setup(4, bit | extra) == 0:
            flags.append(name)
    info["setup_flags"] = flags
    info["modes"] = [m for m, ops in _NEEDED.items() if all(o in names for o in ops)]
    return info
