"""Raw operations: SQEs built in Python, for the kernel-fact tests.

The transfer engine in C runs sendfile() transfers on its own; these ops go through its raw-op
interface (us_raw_submit), which prepares them exactly as given, whole chains only, and hands
their CQEs back in us_run's batch. This ledger routes each CQE to its op's owner by user_data
(assigned by the engine, never reused). Kernel facts relied on, as for the engine
(docs/kernel-facts.md): a SEND_ZC result with IORING_CQE_F_MORE is followed by a notification with
the same user_data, also after errors [KF 11]; a SEND_ZC cancelled by a broken link completes
-ECANCELED without F_MORE, yet a notification still arrives [KF 12]; with
IORING_SEND_ZC_REPORT_USAGE the notification's res is a flag word [KF 15].
"""
import errno
import select

from . import _lowlevel as ll

_ZC_COPIED = ll.IORING_NOTIF_USAGE_ZC_COPIED
_F_MORE = ll.IORING_CQE_F_MORE
_F_NOTIF = ll.IORING_CQE_F_NOTIF
_ZC_OPS = (ll.OP_SEND_ZC, ll.OP_SEND_ZC_FIXED)
_SPLICE_OPS = (ll.OP_SPLICE, ll.OP_TEE)


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
        self.op_flags = op_flags  # msg_flags, splice_flags or the poll mask, by opcode
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
        f = {"addr": self.addr, "off": self.off, "off_in": self.off_in, "fd": self.fd, "fd_in": self.fd_in,
             "len": self.len, "zc_flags": self.zc_flags, "buf_index": self.buf_index,
             "opcode": self.opcode, "sqe_flags": sqe_flags}
        if self.opcode in _SPLICE_OPS:
            f["splice_flags"] = self.op_flags
        elif self.opcode == ll.OP_POLL_ADD:
            f["poll_mask"] = self.op_flags or select.POLLOUT
        else:
            f["msg_flags"] = self.op_flags
        return f


class Ledger:
    """Raw ops in flight, by user_data; routes their CQEs to their owners' ``_on_result`` and
    ``_on_release``. ``trace`` (a list, when wanted) gets (t_ns, op, user_data, res, flags)."""

    def __init__(self, core):
        self._core = core
        self._ops = {}
        self.trace = None

    def __len__(self):
        return len(self._ops)

    def ops(self):
        return list(self._ops.values())

    def awaiting_result(self):
        return [op for op in self._ops.values() if op.res is None]

    def submit(self, chain, sqe_flags=None):
        """Submit ``chain`` (ops linked with IOSQE_IO_LINK, all but the last), or ops with exactly
        the ``sqe_flags`` given (one per op)."""
        link = ll.IOSQE_IO_LINK
        if sqe_flags is None:
            sqe_flags = [link] * (len(chain) - 1) + [0]
        fields = [op.fields(flags) for op, flags in zip(chain, sqe_flags)]
        if len(fields) > self._core.sq_entries and all(f & (link | ll.IOSQE_IO_HARDLINK) for f in sqe_flags[:-1]):
            raise ValueError(f"a chain of {len(fields)} ops cannot fit a ring of {self._core.sq_entries} entries")
        for op, user_data in zip(chain, self._core.raw_submit(fields)):
            op.user_data = user_data
            self._ops[user_data] = op

    def dispatch(self, user_data, res, flags, now):
        """Hand one raw CQE to its op's owner."""
        ops = self._ops
        op = ops.get(user_data)
        if self.trace is not None:
            self.trace.append((now, op, user_data, res, flags))
        if op is None:
            return
        if flags & _F_NOTIF:
            del ops[user_data]
            copied = None
            if op.zc_flags & ll.IORING_SEND_ZC_REPORT_USAGE:
                copied = bool(res & _ZC_COPIED)
            op.owner._on_release(op, copied, now)
            return
        op.res = res
        if op.opcode in _ZC_OPS and (flags & _F_MORE or res == -errno.ECANCELED):
            op.awaiting_notif = True
        else:
            del ops[user_data]
        op.owner._on_result(op, res, now)
