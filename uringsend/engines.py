"""Engines: how each mode turns a file range into chains of SQEs, and what their CQEs mean.

A transfer has at most one chain in flight, so its bytes reach the socket in order. A chain is a
window of chunks; when its last result arrives the engine looks at what happened and builds the
next one from the first byte the socket did not take:
- a short fill (READ or file->pipe splice) means the file ended early: the transfer ends short;
- a short send, -EAGAIN, or a member cancelled by a broken link is retried from that byte;
- any other error ends the transfer with an OSError naming the op and fd.
Every op stays in the ledger until nothing more can arrive for it; only then does the engine let go
of the buffer, pipe or mapping it used.
"""
import errno
import os
import select
import socket

from . import _lowlevel as ll
from ._lowlevel import PAGE
from .errors import TransferCancelled, fd_name, memlock_text, op_error
from .ledger import Op
from .transfer import QUEUED, RELEASED, SENT
from .zc import max_zc_chunk


SEND_FLAGS = socket.MSG_WAITALL | socket.MSG_NOSIGNAL  # WAITALL: a short send breaks the link
HEADER_FLAGS = SEND_FLAGS | socket.MSG_MORE             # header and body leave as one stream
REPORT_USAGE = ll.IORING_SEND_ZC_REPORT_USAGE
_RETRY = (-errno.ECANCELED, -errno.EINTR, -512, -errno.EAGAIN)  # -512: ERESTARTSYS from a cancel
MAX_STALLS = 8  # chains in a row that moved no byte before the transfer gives up
CHAIN_BYTES = 8 << 20  # bytes one chain of a mapping-based transfer may carry


class Engine:
    mode = None
    window = 8  # chunks per chain
    ops_per_chunk = 2

    def __init__(self, ring, transfer, sock_fd, file_fd, start, end, header):
        self.ring = ring
        self.t = transfer
        self.sock = sock_fd
        self.file = file_fd
        self.pos = start
        self.end = end
        self.header = header
        self.fds = [sock_fd, file_fd]  # our own duplicates: the socket's closed when done, the file's when settled
        # a chain (POLL_ADD, header and the chunks) must fit the SQ: it is never split
        self.window = max(1, min(self.window, (ring.sq_entries - 2) // self.ops_per_chunk))
        self.chain_left = 0   # results still due for the chain in flight
        self.outstanding = 0  # ops not yet over (results or notifications still due)
        self.cancelled = False
        self.poll_first = False
        self.stalls = 0
        self._mark = None
        self._last_res = 0

    @property
    def done(self):
        return self.t.done

    # ---- building ----------------------------------------------------------------------------
    def pump(self):
        """Submit the next chain, finish, or wait for a resource (a waiter list readies us)."""
        t = self.t
        if self.chain_left or t.done:
            return
        if t.error is not None or self.cancelled or (self.pos >= self.end and self._header_left() == 0):
            self._finish()
            return
        if self.stalls >= MAX_STALLS:
            t.error = op_error(self._last_res or -errno.EIO, f"{self.mode} transfer", t.sock_fd)
            self._finish()
            return
        ops = []
        if self.poll_first:
            ops.append(Op(self, ll.OP_POLL_ADD, self.sock, op_flags=select.POLLOUT, role="poll"))
        left = self._header_left()
        if left:
            pin = ll.Pinned(self.header)
            ops.append(Op(self, ll.OP_SEND, self.sock, addr=pin.address + t.header_sent, len=left,
                          op_flags=HEADER_FLAGS if self.pos < self.end else SEND_FLAGS,
                          role="header", keep=pin))
        body = self._build(self.pos, self.end) if self.pos < self.end else []
        if not body and not left:
            return  # starved: a pool or budget will ready us
        ops += body
        self.poll_first = False
        self.chain_left = len(ops)
        self.outstanding += len(ops)
        self._mark = (self.pos, t.header_sent)
        self.ring._submit_chain(ops)

    def _header_left(self):
        return len(self.header) - self.t.header_sent

    def _build(self, pos, end):
        raise NotImplementedError

    # ---- completions -------------------------------------------------------------------------
    def _on_result(self, op, res, now):
        self.chain_left -= 1
        role = op.role
        if res < 0:
            self._last_res = res
        if role == "send" or role == "header":
            if res >= 0:
                self._sent(op, res, now)
            elif res == -errno.EAGAIN:
                self.poll_first = True  # O_NONBLOCK socket under splice: wait for POLLOUT, retry
            elif res not in _RETRY and not self._send_error(op, res):
                self._fail(op, res, self.t.sock_fd)
        elif role == "fill":
            if 0 <= res < op.len and os.fstat(self.file).st_size < op.offset + op.len:
                self.end = min(self.end, op.offset + res)  # the file ended early
            elif res < 0 and res not in _RETRY:
                self._fail(op, res, self.t.file_fd)
        elif res < 0 and res not in _RETRY:
            self._fail(op, res, self.t.sock_fd)
        if not op.awaiting_notif:
            self._op_over(op)
        if self.chain_left == 0:
            self._chain_over()

    def _sent(self, op, n, now):
        t = self.t
        if op.role == "header":
            t.header_sent += n
            offset = None
        else:
            self.pos = op.offset + n
            t.sent += n
            offset = op.offset
        if not n:
            return
        if op.opcode == ll.OP_SPLICE:
            t._event(QUEUED, offset, n, None, now)
        else:
            t._event(SENT, offset, n, None, now)
            if op.opcode == ll.OP_SEND:
                t._event(RELEASED, offset, n, True, now)  # a copying send is done with the memory

    def _on_release(self, op, copied, now):
        if op.res is not None and op.res > 0:
            self.t._event(RELEASED, op.offset if op.role == "send" else None, op.res, copied, now)
        self._op_over(op)

    def _send_error(self, op, res):
        """Recovery for a failed send; True when handled (the chain is rebuilt from self.pos)."""
        if res == -errno.EOPNOTSUPP and op.zerocopy:  # e.g. AF_UNIX: no SEND_ZC there
            self.zc = False
            self.t.fallback = "SEND_ZC is not supported on this socket (EOPNOTSUPP): copying sends"
            return True
        return False

    def _fail(self, op, res, fd):
        """Record the first error; ``fd`` is the caller's (None: the file was given by path)."""
        if self.t.error is None:
            self.t.error = op_error(res, op.name.lower(), fd)

    def _chain_over(self):
        if self._mark == (self.pos, self.t.header_sent) and self.pos < self.end and not self.poll_first:
            self.stalls += 1
        else:
            self.stalls = 0
        self.ring._ready(self)

    def _op_over(self, op):
        self.outstanding -= 1
        self._let_go(op)
        if self.t.done:
            self._maybe_settle()

    def _let_go(self, op):
        if op.role == "header":
            op.keep.unpin()

    # ---- ending ------------------------------------------------------------------------------
    def cancel(self):
        self.cancelled = True
        self.ring._cancel_ops(self)
        if self.chain_left == 0:
            self.ring._ready(self)

    def _withdrawn(self, ops):
        """Ops that were queued in user space and never submitted."""
        for op in ops:
            self.chain_left -= 1
            self._op_over(op)
        if self.chain_left == 0:
            self.ring._ready(self)

    def _finish(self):
        t = self.t
        if self.cancelled and t.error is None and (self.pos < self.end or self._header_left()):
            t.error = TransferCancelled(f"transfer cancelled after {t.sent} of {t.count} bytes")
        t.done = True
        # No op will be issued on the socket any more (notifications and cancels go by
        # user_data): let it go now, so a caller's close() really closes the connection.
        os.close(self.fds.pop(0))
        self._maybe_settle()

    def _maybe_settle(self):
        if self.outstanding or self.t.settled:
            return
        self._teardown()
        self.drop_fds()
        self.t.settled = True
        self.ring._settled(self)

    def _teardown(self):
        pass

    def drop_fds(self):
        """Close this engine's own fds: it has settled, or its ring is gone (no request left)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


class SpliceEngine(Engine):
    """SPLICE(file -> pipe) linked to SPLICE(pipe -> socket), never more than the pipe holds."""

    mode = "splice"

    def __init__(self, *args):
        super().__init__(*args)
        self.pipe = None

    def _build(self, pos, end):
        if self.pipe is None:
            self.pipe = self.ring.pipes.acquire()
        pipe = self.pipe
        ops = []
        for _ in range(self.window):
            if pos >= end:
                break
            # A pipe holds capacity/PAGE pages: a chunk from an unaligned offset ends on a page
            # boundary, or it would span one page more than the pipe has slots for.
            n = min(pipe.capacity - pos % PAGE, end - pos)
            ops.append(Op(self, ll.OP_SPLICE, pipe.w, fd_in=self.file, off_in=pos, off=-1, len=n,
                          role="fill", offset=pos))
            ops.append(Op(self, ll.OP_SPLICE, self.sock, fd_in=pipe.r, off_in=-1, off=-1, len=n,
                          role="send", offset=pos))
            pos += n
        return ops

    def _chain_over(self):
        if self.pipe is not None and self.pipe.pending():
            self.t.stranded += self.pipe.drain()  # a broken chain left bytes behind: resend from file
        super()._chain_over()

    def _teardown(self):
        if self.pipe is not None:
            self.ring.pipes.give_back(self.pipe)
            self.pipe = None

    def drop_fds(self):
        super().drop_fds()
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


class ZeroCopyEngine(Engine):
    """READ_FIXED into a registered buffer linked to SEND_ZC_FIXED from it: the peer gets a
    snapshot, and the buffer returns to the pool only on its notification."""

    mode = "zerocopy"
    zc = True

    def _build(self, pos, end):
        pool = self.ring._buffer_pool()
        ops = []
        for _ in range(self.window):
            if pos >= end:
                break
            index = pool.acquire(self)
            if index is None:
                break
            pool.hold(index)  # one reference for the read, one for the send
            n = min(pool.size, end - pos)
            addr = pool.address(index)
            ops.append(Op(self, ll.OP_READ_FIXED, self.file, addr=addr, len=n, off=pos,
                          buf_index=index, role="fill", offset=pos, keep=index))
            if self.zc:
                ops.append(Op(self, ll.OP_SEND_ZC_FIXED, self.sock, addr=addr, len=n, op_flags=SEND_FLAGS,
                              zc_flags=REPORT_USAGE, buf_index=index, role="send", offset=pos, keep=index))
            else:
                ops.append(Op(self, ll.OP_SEND, self.sock, addr=addr, len=n, op_flags=SEND_FLAGS,
                              role="send", offset=pos, keep=index))
            pos += n
        return ops

    def _let_go(self, op):
        if op.role == "header":
            op.keep.unpin()
        else:
            self.ring._let_go_buffer(op.keep)


class MapEngine(Engine):
    ops_per_chunk = 1

    """SEND_ZC (mode 'mmap') or SEND (mode 'copy') straight from a shared read-only mapping.

    For 'mmap', RELEASED for a range means the kernel no longer references those page-cache pages:
    the caller may modify that range of the file. Pinned pages count against RLIMIT_MEMLOCK, so the
    ring bounds the bytes awaiting release; -ENOMEM under auto falls back to copying sends.
    """

    def __init__(self, ring, transfer, sock_fd, file_fd, start, end, header, zerocopy, auto, st):
        super().__init__(ring, transfer, sock_fd, file_fd, start, end, header)
        self.zc = zerocopy
        self.auto = auto
        self.mode = "mmap" if zerocopy else "copy"  # what was asked; self.zc says what runs
        self.chunk = ring.chunk_size if zerocopy else ring.copy_chunk_size
        if zerocopy:  # one send's pinned pages must fit the budget by themselves
            self.chunk = min(self.chunk, max_zc_chunk(ring.zc_budget))
        self.window = max(1, min(self.window, CHAIN_BYTES // self.chunk))
        self.map_key = self.map = None
        if end > start:
            self.map_key, self.map = ring.mappings.acquire(file_fd, st)

    def _build(self, pos, end):
        ops = []
        base = self.map.address
        for _ in range(self.window):
            if pos >= end:
                break
            n = min(self.chunk, end - pos)
            if self.zc:
                if not self.ring._reserve_zc(self, n):
                    break
                ops.append(Op(self, ll.OP_SEND_ZC, self.sock, addr=base + pos, len=n, op_flags=SEND_FLAGS,
                              zc_flags=REPORT_USAGE, role="send", offset=pos))
            else:
                ops.append(Op(self, ll.OP_SEND, self.sock, addr=base + pos, len=n, op_flags=SEND_FLAGS,
                              role="send", offset=pos))
            pos += n
        return ops

    def _send_error(self, op, res):
        if res == -errno.EFAULT:
            size = os.fstat(self.file).st_size
            if size < self.end:  # truncated under the mapping: the rest of the file is gone
                self.end = max(self.pos, size)
                self._check_size(size)
                return True
        if res == -errno.ENOMEM and op.zerocopy:
            if self.auto:
                self.zc = False
                self.t.fallback = "SEND_ZC failed with ENOMEM (RLIMIT_MEMLOCK): copying sends instead"
            elif self.t.error is None:
                self.t.error = OSError(errno.ENOMEM, (
                    f"send_zc on {fd_name(self.t.sock_fd)}: {os.strerror(errno.ENOMEM)}: pages pinned by "
                    f"zero-copy sends count against RLIMIT_MEMLOCK ({memlock_text()}); lower "
                    "Ring(zc_budget=...) or raise the limit"))
            return True
        if super()._send_error(op, res):
            self.chunk = self.ring.copy_chunk_size
            self.window = max(1, min(self.window, CHAIN_BYTES // self.chunk))
            return True
        return False

    def _finish(self):
        if self.t.error is None and self.pos > self.t.offset:
            self._check_size(os.fstat(self.file).st_size)
        super()._finish()

    def _check_size(self, size):
        """A file truncated mid-page keeps that page mapped, zero-filled past the new end: a send
        through the mapping cannot see EOF there. Say so rather than report success."""
        if self.pos > size and self.t.error is None:
            self.t.error = OSError(errno.EFAULT, (
                f"send from the mapping of {fd_name(self.t.file_fd)}: the file shrank to {size} bytes "
                f"during the transfer and the {self.pos - size} bytes after that went out as "
                "zeros (modes 'splice' and 'zerocopy' read the file and stop at its end)"))

    def _let_go(self, op):
        if op.role == "header":
            op.keep.unpin()
            return
        if op.zerocopy:
            self.ring._unreserve_zc(op.len)
        if self.map.length > self.ring.mappings.large:
            self.map.drop(op.offset, op.len)  # keep RSS to what is in flight

    def _teardown(self):
        if self.map is not None:
            self.ring.mappings.give_back(self.map_key)
            self.map = None

