"""Bounded pools: registered buffers for zero-copy sends, and pipes for splice chains."""
import array
import collections
import errno
import fcntl
import mmap
import os
import termios

from ._lowlevel import PAGE, FileMapping, Pinned
from .errors import memlock_text



def pipe_max_size():
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 20


class BufferPool:
    """``count`` page-aligned buffers of ``size`` bytes in one anonymous mapping, registered with
    the ring as fixed buffers 0..count-1. A buffer comes back only when its last user lets go."""

    def __init__(self, raw_ring, count, size):
        if count < 1 or size < PAGE or size % PAGE:
            raise ValueError(f"buffers must be >= 1 and buffer_size a multiple of {PAGE}")
        self.count = count
        self.size = size
        self._map = mmap.mmap(-1, count * size)
        self._pin = Pinned(self._map)
        try:
            raw_ring.register_buffers([(self._pin.address + i * size, size) for i in range(count)])
        except OSError as exc:
            self.close()
            if exc.errno != errno.ENOMEM:
                raise
            raise OSError(errno.ENOMEM, (
                f"io_uring_register_buffers ({count} x {size} bytes): {os.strerror(errno.ENOMEM)}: "
                f"registered buffers count against RLIMIT_MEMLOCK ({memlock_text()}); use "
                "Ring(buffers=..., buffer_size=...) to register less, or raise the limit")) from None
        self._free = list(range(count - 1, -1, -1))
        self._refs = [0] * count
        self.waiters = []

    def address(self, index):
        return self._pin.address + index * self.size

    def view(self, index):
        return memoryview(self._map)[index * self.size:(index + 1) * self.size]

    @property
    def free(self):
        return len(self._free)

    def acquire(self, waiter):
        """A free buffer index holding one reference, or None (``waiter`` is readied on a return)."""
        if not self._free:
            if waiter not in self.waiters:
                self.waiters.append(waiter)
            return None
        index = self._free.pop()
        self._refs[index] = 1
        return index

    def hold(self, index):
        self._refs[index] += 1

    def let_go(self, index):
        self._refs[index] -= 1
        if self._refs[index] == 0:
            self._free.append(index)
        elif self._refs[index] < 0:
            raise AssertionError(f"buffer {index} let go more often than held")

    def take_waiters(self):
        waiters, self.waiters = self.waiters, []
        return waiters

    def close(self):
        """Unmap; only when no buffer is held (the ring is gone or everything was released)."""
        self._pin.unpin()
        self._map.close()


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


class MappingCache:
    """Read-only mappings of whole files, shared by the transfers that send them, so the mapping
    cost (and its page faults) is paid once per file (for files up to ``large`` bytes). Keyed by device, inode, size and mtime: a
    file that changed size or was replaced gets a new mapping. Up to ``keep`` idle mappings stay;
    a busy one is unmapped only when its last transfer has nothing in the kernel any more."""

    def __init__(self, keep=64, large=16 << 20):
        self.keep = keep
        self.large = large  # larger mappings are not kept idle, and shed pages as they are released
        self._maps = {}  # key -> [FileMapping, users]
        self._idle = collections.OrderedDict()
        self.created = 0

    def acquire(self, fd, st):
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        entry = self._maps.get(key)
        if entry is None:
            entry = self._maps[key] = [FileMapping(fd, st.st_size, 0), 0]
            self.created += 1
        entry[1] += 1
        self._idle.pop(key, None)
        return key, entry[0]

    def give_back(self, key):
        entry = self._maps[key]
        entry[1] -= 1
        if entry[1] == 0:
            if entry[0].length > self.large:
                self._maps.pop(key)[0].unmap()
                return
            self._idle[key] = None
            while len(self._idle) > self.keep:
                old, _ = self._idle.popitem(last=False)
                self._maps.pop(old)[0].unmap()

    @property
    def busy(self):
        return len(self._maps) - len(self._idle)

    def close(self):
        """Unmap the idle mappings; busy ones (kernel may still read them) stay mapped."""
        while self._idle:
            key, _ = self._idle.popitem()
            self._maps.pop(key)[0].unmap()
