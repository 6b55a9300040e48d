"""uringsend: send files to sockets through io_uring, and learn when the kernel released each buffer."""
from .errors import IoUringUnavailable, ReleaseNotReported, RingOwnerError, TransferCancelled
from .blocking import sendfile
from .probe import probe
from .ring import MODES, Ring
from .transfer import QUEUED, RELEASED, SENT, Event, Transfer

__all__ = ["Ring", "sendfile", "probe", "Transfer", "Event", "MODES", "SENT", "RELEASED", "QUEUED", "IoUringUnavailable",
           "TransferCancelled", "ReleaseNotReported", "RingOwnerError"]
__version__ = "0.1.0"
