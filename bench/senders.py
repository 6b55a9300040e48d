"""The contenders: how the server side sends ``size`` bytes of an open file to a connected socket.

Each sender is created once and reused for every request, as a server would: the blocking ones
keep their pipe or buffer, the uringsend ones keep one Ring (created on the thread that uses it).
``send`` returns the time from submission to the last ``released`` event for uringsend's stable
modes, else None.
"""
import fcntl
import os

import uringsend

REFERENCE = "splice"
BLOCKING = ("splice", "sendfile", "read-send")
URING_MODES = ("splice", "zerocopy", "mmap", "copy", "auto")
STABLE_MODES = ("zerocopy", "mmap", "copy", "auto")  # modes that report "released"
CONTENDERS = BLOCKING + tuple(f"uringsend-{m}" for m in URING_MODES)


def uring_mode(name):
    """'uringsend-copy' -> 'copy'; None for a blocking contender."""
    return name[len("uringsend-"):] if name.startswith("uringsend-") else None


def is_stable(name):
    return uring_mode(name) in STABLE_MODES


WAIT_LIMIT = 120.0


class BlockingSplice:
    """splice(file -> pipe) then splice(pipe -> socket) until the pipe is empty, pipe kept open."""

    name = "splice"

    def __init__(self, pipe_size=1 << 20):
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, pipe_size)
        except OSError:
            pass  # past pipe-max-size: keep the default size
        self.capacity = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def send(self, sock, fd, size):
        sock_fd = sock.fileno()
        off = 0
        while off < size:
            n = os.splice(fd, self.w, min(self.capacity, size - off), offset_src=off)
            if n == 0:
                raise EOFError(f"file ended at {off} of {size} bytes")
            left = n
            while left:
                left -= os.splice(self.r, sock_fd, left)
            off += n
        return None

    def close(self):
        os.close(self.r)
        os.close(self.w)


class Sendfile:
    name = "sendfile"

    def send(self, sock, fd, size):
        sock_fd = sock.fileno()
        off = 0
        while off < size:
            n = os.sendfile(sock_fd, fd, off, size - off)
            if n == 0:
                raise EOFError(f"file ended at {off} of {size} bytes")
            off += n
        return None

    def close(self):
        pass


class ReadSend:
    """pread into one reused 1 MiB buffer, then sendall: the copying server."""

    name = "read-send"

    def __init__(self, buffer_size=1 << 20):
        self.view = memoryview(bytearray(buffer_size))

    def send(self, sock, fd, size):
        view = self.view
        off = 0
        while off < size:
            n = os.preadv(fd, [view[:min(len(view), size - off)]], off)
            if n == 0:
                raise EOFError(f"file ended at {off} of {size} bytes")
            sock.sendall(view[:n])
            off += n
        return None

    def close(self):
        self.view.release()


class Uring:
    """One Ring, one transfer per request: ``ring.sendfile`` then ``t.wait()`` (and, for stable
    modes, ``t.wait_released()``: a server may reuse or change the data only after that)."""

    def __init__(self, mode, **ring_options):
        self.mode = mode
        self.name = f"uringsend-{mode}"
        self.stable = mode in STABLE_MODES
        self.ring = uringsend.Ring(**ring_options)

    def send(self, sock, fd, size):
        t = self.ring.sendfile(sock, fd, 0, size, mode=self.mode)
        t.wait(WAIT_LIMIT)  # a limit turns a stuck transfer into an error, not a hung run
        if not self.stable:
            return None
        t.wait_released(WAIT_LIMIT)
        return max(e.t_ns for e in t.events if e.kind == uringsend.RELEASED) - t.started_ns

    def counters(self):
        """(chunks copied, chunks sent zero-copy) so far, from the SEND_ZC notifications."""
        stats = self.ring.statistics()
        return stats["copied"], stats["zerocopy"]

    def close(self):
        self.ring.close()


def make(name, pipe_size=1 << 20):
    mode = uring_mode(name)
    if mode is not None:
        return Uring(mode)
    if name == "splice":
        return BlockingSplice(pipe_size)
    if name == "sendfile":
        return Sendfile()
    if name == "read-send":
        return ReadSend()
    raise ValueError(f"unknown contender {name!r}")
