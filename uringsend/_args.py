"""Validation of what callers pass to sendfile() and tee(): sockets, files, counts."""
import errno
import fcntl
import os
import socket
import stat


def _nonneg(name, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    return value


def _sock_fd(sock, op="sendfile"):
    """The fd of a socket (object or fd), or a clear TypeError/OSError naming ``op``."""
    if isinstance(sock, socket.socket):  # known to be a socket: no fstat needed
        fd = sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, f"{op}: socket {sock!r} is closed")
        return fd
    fd = sock if isinstance(sock, int) else getattr(sock, "fileno", lambda: None)()
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"sock must be a socket or a file descriptor, not {type(sock).__name__}")
    if fd < 0:
        raise OSError(errno.EBADF, f"{op}: socket fd {fd}: {os.strerror(errno.EBADF)}")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"{op}: socket fd {fd}: {os.strerror(exc.errno)}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.ENOTSOCK, f"{op}: fd {fd} is not a socket")
    return fd


def _file_fd(file):
    """(an fd of our own for ``file``, the caller's fd or None for a path)."""
    if isinstance(file, (str, bytes, os.PathLike)):
        return os.open(file, os.O_RDONLY | os.O_CLOEXEC), None
    fd = file if isinstance(file, int) else getattr(file, "fileno", lambda: None)()
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"file must be a path, a file object or a file descriptor, not {type(file).__name__}")
    try:
        return _dup(fd), fd
    except OSError as exc:
        raise OSError(exc.errno, f"sendfile: file fd {fd}: {os.strerror(exc.errno)}") from None


def _dup(fd):
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)


def _close(*fds):
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _regular_stat(fd, file):
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"sendfile: file fd {fd}: {os.strerror(exc.errno)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"sendfile: {file!r} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"sendfile: fd {fd} is not a regular file")
    return st
