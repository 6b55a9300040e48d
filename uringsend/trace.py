"""The CQE trace of a ``Ring(trace=True)``: every completion the engine handled, in order."""
from typing import NamedTuple, Optional

from . import _lowlevel as ll


class TraceEntry(NamedTuple):
    t_ns: int
    user_data: int
    res: int
    flags: int
    op: str                 # opcode name ("SEND_ZC", "SPLICE", "FILES_UPDATE", ...)
    role: str               # what the op did for its transfer: fill, send, header, trailer, poll,
                            # cancel, install/unslot (registered file slots), raw (tests), tee
    len: int
    transfer: Optional[object]  # the Transfer, while its handle exists; None for raw ops
    offset: Optional[int] = None  # file offset of the op's chunk (fill, send, tee); None otherwise

    @property
    def zerocopy(self):
        return self.op.startswith("SEND_ZC")

    @property
    def notif(self):
        return bool(self.flags & ll.IORING_CQE_F_NOTIF)


def entries(handles, raw):
    """TraceEntry for each raw trace tuple of ``Core.trace()``; ``handles``: transfer id -> handle."""
    handles = handles if handles is not None else {}
    return [TraceEntry(t_ns, ud, res, flags, ll.opcode_name(opcode), ll.ROLES[role], length,
                       handles.get(xid) if xid else None, None if offset < 0 else offset)
            for t_ns, ud, xid, res, flags, length, opcode, role, offset in raw]
