"""The tee engine: one file to many sockets through IORING_OP_TEE."""
import errno
import os

from . import _lowlevel as ll
from .engines import _RETRY, MAX_STALLS, PAGE
from .errors import TransferCancelled, op_error
from .ledger import Op
from .transfer import QUEUED


class TeeEngine:
    """One file to N sockets, the page cache read once per chunk: SPLICE(file -> src pipe), TEE
    (src -> pipe_i) for all but one socket, SPLICE(pipe_i -> socket_i), SPLICE(src -> last socket).

    Each socket has its own position. A broken chain leaves sockets at different positions, so a
    chunk [a, b) goes only to sockets standing at a, and b never passes the next socket's position:
    no socket gets a byte twice or misses one. A socket that fails or is cancelled drops out alone.
    """

    mode = "splice"

    def __init__(self, ring, transfers, sock_fds, file_fd, start, end):
        self.ring = ring
        self.dests = transfers
        self.socks = sock_fds
        self.file = file_fd
        self.fds = sock_fds + [file_fd]  # our own duplicates
        self.start = start
        self.end = end
        self.pos = [start] * len(transfers)
        self.dropped = [False] * len(transfers)
        self.pipes = [ring.pipes.acquire() for _ in transfers]  # pipes[-1] is the source pipe
        self.chain_left = 0
        self.outstanding = 0
        self.stalls = 0
        self._mark = None
        per_chunk = 2 * len(transfers)
        if per_chunk > ring.sq_entries:
            raise ValueError(f"tee to {len(transfers)} sockets needs a ring of at least {per_chunk} entries")
        self.window = max(1, min(8, ring.sq_entries // per_chunk))

    @property
    def done(self):
        return all(t.done for t in self.dests)

    def _live(self):
        return [i for i, t in enumerate(self.dests) if not t.done and not self.dropped[i]]

    def pump(self):
        if self.chain_left:
            return
        for i in self._live():
            if self.pos[i] >= self.end:
                self._finish(i)
        live = self._live()
        if self.stalls >= MAX_STALLS:
            for i in live:
                self.dests[i].error = op_error(-errno.EIO, "tee transfer", self.dests[i].sock_fd)
                self._finish(i)
            live = []
        for i, t in enumerate(self.dests):
            if self.dropped[i] and not t.done:
                self._finish(i)
        if not live:
            self._maybe_settle()
            return
        src = self.pipes[-1]
        room = min(p.capacity for p in self.pipes)
        pos = {i: self.pos[i] for i in live}
        ops = []
        for _ in range(self.window):
            a = min(pos.values())
            if a >= self.end:
                break
            ahead = [p for p in pos.values() if p > a]
            b = min([self.end, a + room - a % PAGE] + ahead)
            group = [i for i in live if pos[i] == a]
            n = b - a
            ops.append(Op(self, ll.OP_SPLICE, src.w, fd_in=self.file, off_in=a, off=-1, len=n,
                          role="fill", offset=a))
            for i in group[:-1]:
                ops.append(Op(self, ll.OP_TEE, self.pipes[i].w, fd_in=src.r, len=n, role="tee", offset=a))
            for i in group[:-1]:
                ops.append(Op(self, ll.OP_SPLICE, self.socks[i], fd_in=self.pipes[i].r, off_in=-1, off=-1,
                              len=n, role="send", offset=a, keep=i))
            ops.append(Op(self, ll.OP_SPLICE, self.socks[group[-1]], fd_in=src.r, off_in=-1, off=-1,
                          len=n, role="send", offset=a, keep=group[-1]))
            for i in group:
                pos[i] = b
        self._mark = tuple(self.pos)
        self.chain_left = len(ops)
        self.outstanding += len(ops)
        self.ring._submit_chain(ops)

    def _on_result(self, op, res, now):
        self.chain_left -= 1
        self.outstanding -= 1
        if op.role == "send":
            i = op.keep
            t = self.dests[i]
            if res >= 0:
                self.pos[i] = op.offset + res
                t.sent += res
                if res:
                    t._event(QUEUED, op.offset, res, None, now)
            elif res not in _RETRY and t.error is None:
                t.error = op_error(res, "splice", t.sock_fd)
                self.dropped[i] = True
        elif op.role == "fill":
            if 0 <= res < op.len and os.fstat(self.file).st_size < op.offset + op.len:
                self.end = min(self.end, op.offset + res)
            elif res < 0 and res not in _RETRY:
                err = op_error(res, "splice", self.dests[0].file_fd)
                for i in self._live():
                    self.dests[i].error = err
                    self.dropped[i] = True
        if self.chain_left == 0:
            for pipe in self.pipes:
                if pipe.pending():
                    stranded = pipe.drain()
                    self.dests[0].stranded += stranded
            self.stalls = self.stalls + 1 if tuple(self.pos) == self._mark else 0
            self.ring._ready(self)

    def _on_release(self, op, copied, now):
        pass

    def _finish(self, i):
        t = self.dests[i]
        if self.dropped[i] and t.error is None and self.pos[i] < self.end:
            t.error = TransferCancelled(f"transfer cancelled after {t.sent} of {t.count} bytes")
        t.done = True
        fd = self.socks[i]  # no op will be issued on it any more: a caller's close() closes it
        if fd in self.fds:
            self.fds.remove(fd)
            os.close(fd)

    def cancel_dest(self, i):
        self.dropped[i] = True
        if self.chain_left:
            self.ring._cancel_ops(self, lambda op: op.role == "send" and op.keep == i)
        else:
            self.ring._ready(self)

    def cancel(self):
        for i in range(len(self.dests)):
            self.dropped[i] = True
        self.ring._cancel_ops(self)
        if not self.chain_left:
            self.ring._ready(self)

    def _withdrawn(self, ops):
        self.chain_left -= len(ops)
        self.outstanding -= len(ops)
        if self.chain_left == 0:
            self.ring._ready(self)

    def _maybe_settle(self):
        if self.outstanding or not self.done or self.dests[0].settled:
            return
        for pipe in self.pipes:
            self.ring.pipes.give_back(pipe)
        self.pipes = []
        self.drop_fds()
        for t in self.dests:
            t.settled = True
        self.ring._settled(self)

    def drop_fds(self):
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
        for pipe in self.pipes:
            pipe.close()
        self.pipes = []
