"""The completion ledger: user_data -> the operation in flight, and the buffer it holds.

Kernel facts this relies on (Linux 6.18, see SEMANTICS.md in the project's design notes):
- A SEND_ZC result CQE with IORING_CQE_F_MORE is followed by a notification CQE
  (IORING_CQE_F_NOTIF) with the same user_data, also after errors. Only the notification says the
  kernel no longer references the buffer.
- A SEND_ZC cancelled because an earlier link member failed completes -ECANCELED *without* F_MORE,
  yet a notification still arrives. So -ECANCELED on a zero-copy send also waits for one.
- Notifications arrive out of submission order across sockets: everything is keyed by user_data.
- With IORING_SEND_ZC_REPORT_USAGE the notification's res is a flag word (ZC_COPIED is bit 31 and
  reads as a negative s32): never an errno.
- user_data is a 64-bit counter and is never reused, so a late or orphan notification can never be
  routed to a newer operation.
A failed completion never raises here: it is handed to the operation's owner, which records it on
its transfer for the caller who waits.
"""
import errno

from . import _lowlevel as ll

_ZC_COPIED = ll.IORING_NOTIF_USAGE_ZC_COPIED
_F_MORE = ll.IORING_CQE_F_MORE
_F_NOTIF = ll.IORING_CQE_F_NOTIF
_ZC_OPS = (ll.OP_SEND_ZC, ll.OP_SEND_ZC_FIXED)


class Op:
    """One SQE: its fields, who handles its completions, and what it keeps alive."""

    __slots__ = ("user_data", "opcode", "fd", "addr", "len", "off", "fd_in", "off_in", "op_flags",
                 "zc_flags", "buf_index", "owner", "role", "offset", "keep", "res", "awaiting_notif")

    def __init__(self, owner, opcode, fd, *, addr=0, len=0, off=0, fd_in=0, off_in=0, op_flags=0,
                 zc_flags=0, buf_index=0, role=None, offset=None, keep=None):
        self.user_data = 0
        self.owner = owner
        self.opcode = opcode
        self.fd = fd
        self.addr = addr
        self.len = len
        self.off = off
        self.fd_in = fd_in
        self.off_in = off_in
        self.op_flags = op_flags
        self.zc_flags = zc_flags
        self.buf_index = buf_index
        self.role = role
        self.offset = offset
        self.keep = keep
        self.res = None
        self.awaiting_notif = False

    @property
    def zerocopy(self):
        return self.opcode in _ZC_OPS

    @property
    def name(self):
        return ll.opcode_name(self.opcode)

    def fields(self, sqe_flags):
        return (self.user_data, self.addr, self.off, self.off_in, self.fd, self.fd_in, self.len,
                self.op_flags, self.zc_flags, self.buf_index, self.opcode, sqe_flags)


class Ledger:
    """Routes CQEs to their operations' owners; counts what is still in flight."""

    def __init__(self):
        self._ops = {}
        self._next = 1
        self.pending_notifs = 0
        self.completed = 0
        self.notifs = 0
        self.copied = 0
        self.zerocopy = 0
        self.orphans = 0
        self.trace = None  # a list to append (t_ns, op, user_data, res, flags) to, when wanted

    def __len__(self):
        return len(self._ops)

    def add(self, op):
        op.user_data = self._next
        self._next += 1
        self._ops[op.user_data] = op

    def ops(self):
        return list(self._ops.values())

    def awaiting_result(self):
        return [op for op in self._ops.values() if op.res is None]

    def dispatch_one(self, cqe, now):
        """Hand one (user_data, res, flags) to its op's owner."""
        user_data, res, flags = cqe
        ops = self._ops
        op = ops.get(user_data)
        if self.trace is not None:
            self.trace.append((now, op, user_data, res, flags))
        if op is None:
            self.orphans += 1
            return
        if flags & _F_NOTIF:
            del ops[user_data]
            self.pending_notifs -= 1
            self.notifs += 1
            copied = None
            if op.zc_flags & ll.IORING_SEND_ZC_REPORT_USAGE:
                copied = bool(res & _ZC_COPIED)
                if op.res > 0:  # a send that moved nothing is flagged "copied" too: not counted
                    if copied:
                        self.copied += 1
                    else:
                        self.zerocopy += 1
            op.owner._on_release(op, copied, now)
            return
        self.completed += 1
        op.res = res
        if op.opcode in _ZC_OPS and (flags & _F_MORE or res == -errno.ECANCELED):
            op.awaiting_notif = True
            self.pending_notifs += 1
        else:
            del ops[user_data]
        op.owner._on_result(op, res, now)
