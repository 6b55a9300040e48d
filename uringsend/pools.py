"""The pipes of the tee engine (the C engine keeps its own pipes, buffers and file mappings)."""
import array
import fcntl
import os
import termios




def pipe_max_size():
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 20


class Pipe:
    __slots__ = ("r", "w", "capacity")

    def __init__(self, size):
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass  # EPERM past pipe-max-size or pipe-user-pages limits: keep what the kernel gave
        self.capacity = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def pending(self):
        """Bytes sitting in the pipe (FIONREAD)."""
        buf = array.array("i", [0])
        fcntl.ioctl(self.r, termios.FIONREAD, buf, True)
        return buf[0]

    def drain(self):
        """Read out and discard whatever is in the pipe; returns the byte count."""
        total = 0
        n = self.pending()
        while n:
            total += len(os.read(self.r, n))
            n = self.pending()
        return total

    def close(self):
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Pipes are pooled, not made per transfer: past pipe-user-pages-soft new pipes shrink to 8 KiB."""

    def __init__(self, size=None, keep=16):
        self.size = min(size or (1 << 20), pipe_max_size())
        self.keep = keep
        self._idle = []
        self.created = 0

    def acquire(self):
        if self._idle:
            return self._idle.pop()
        self.created += 1
        return Pipe(self.size)

    def give_back(self, pipe):
        """Return an empty pipe; a pipe that cannot be emptied is closed instead."""
        try:
            pipe.drain()
        except OSError:
            pipe.close()
            return
        if len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            pipe.close()

    @property
    def idle(self):
        return len(self._idle)

    def close(self):
        while self._idle:
            self._idle.pop().close()
