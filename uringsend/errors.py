"""uringsend's exceptions. Kernel errors stay plain OSError (Python picks the subclass)."""
import concurrent.futures
import errno
import os
import resource


class IoUringUnavailable(OSError):
    """io_uring cannot be used in this process: the kernel lacks it or something forbids it."""

    def __init__(self, err):
        if err == errno.ENOSYS:
            why = ("the kernel has no io_uring (io_uring_setup is ENOSYS): it was built without "
                   "CONFIG_IO_URING, or a seccomp filter (container runtime) answers ENOSYS for it. "
                   "Use a kernel >= 6.0 with io_uring, or allow io_uring_setup in the seccomp profile")
        elif err == errno.EPERM:
            why = ("io_uring_setup was refused with EPERM: kernel.io_uring_disabled is set "
                   "(sysctl kernel.io_uring_disabled=0 enables it; 1 allows only the io_uring_group) "
                   "or a seccomp filter (container runtime) blocks it; allow io_uring_setup there")
        else:
            why = f"io_uring_setup failed: {os.strerror(err)}"
        super().__init__(err, why)


class TransferCancelled(OSError, concurrent.futures.CancelledError):
    """The transfer was cancelled before it finished; ``Transfer.sent`` says how far it got.
    An OSError (ECANCELED) and a ``concurrent.futures.CancelledError``."""

    def __init__(self, what="transfer cancelled"):
        super().__init__(errno.ECANCELED, what)


class ReleaseNotReported(RuntimeError):
    """splice hands page-cache pages to the socket by reference; the kernel never says when it is done."""


class RingOwnerError(RuntimeError):
    """A ring is used from a thread or process other than the one that created it."""


def op_error(res, op, fd):
    """OSError for a negative CQE ``res``: ``<op> on fd N: <strerror>`` (N is the caller's fd;
    None when the file was given by path)."""
    err = -res
    return OSError(err, f"{op} on {fd_name(fd)}: {os.strerror(err)}")


def fd_name(fd):
    return "the file" if fd is None else f"fd {fd}"


def memlock_text():
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
