"""asyncio integration: transfers driven by the event loop, woken by an eventfd.

The ring signals an eventfd (io_uring_register_eventfd) when completions are ready. The loop
watches it; on each wake, and once after every submission that did not settle inside the call (a
step can complete inline, before any signal is read), it reads the eventfd first, so a signal
raised while reaping is never lost, then reaps until the ring is empty and resolves the waiters.
Submission and reaping stay on the loop's thread, which owns the ring.

``install()`` (in ``_aioinstall``, exported here) puts a ring per loop under ``loop.sendfile()``
and ``loop.sock_sendfile()`` for servers that already call them (docs/asyncio.md).

Rings here are set up without DEFER_TASKRUN. With it the eventfd does fire (when deferred work is
queued), but a GETEVENTS that does not wait, the only kind an event loop may make, runs at most 20
deferred items (IO_LOCAL_TW_DEFAULT_MAX on 6.18); items that post no CQE (a send retried after
socket space appeared, still partial) still count, and what is left gets no new signal until new
work arrives. Seen here: 500 concurrent sends to readers stalled for good. With COOP_TASKRUN the
kernel runs task work, all of it, on the thread's next return from a system call (a sleeping
epoll_wait is woken for it), and the CQEs it posts signal the eventfd.
"""
import asyncio
import errno
import os

from . import _lowlevel as ll
from .ring import SETUP_ATTEMPTS, Ring
from .transfer import Transfer

_DEFER = ll.SETUP_FLAGS["DEFER_TASKRUN"]


class AsyncRing:
    """A ``Ring`` driven by the running asyncio loop. Create it on the loop's thread (inside a
    coroutine); it accepts every ``Ring`` option (``setup_flags`` without DEFER_TASKRUN). Close
    it with ``await ring.aclose()`` or ``async with``: transfers still running are cancelled and
    their memory waited for."""

    def __init__(self, entries=256, *, setup_flags=None, **options):
        self._loop = asyncio.get_running_loop()
        if setup_flags is not None and setup_flags & _DEFER:
            raise ValueError("an AsyncRing cannot use IORING_SETUP_DEFER_TASKRUN: its non-waiting "
                             "reaps would leave deferred work unrun (see uringsend.aio)")
        self.ring = _ring(entries, setup_flags, options)
        self._active = {}       # Transfer -> AsyncTransfer, until the transfer settles
        self._reap_due = False
        self._closing = False
        self._idle = None       # resolved by the reaper when nothing is left in flight (aclose)
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self.ring.close()
            raise
        try:
            self.ring.register_eventfd(self._efd)
            self._loop.add_reader(self._efd, self._wake)
        except BaseException:
            self.ring.close()
            os.close(self._efd)
            raise

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    @property
    def closed(self):
        return self.ring.closed

    def sendfile(self, sock, file, offset=0, count=None, *, mode="auto", headers=None, trailers=None,
                 on_release=None, header=None):
        """Start a transfer (arguments as ``Ring.sendfile``); returns an ``AsyncTransfer`` at once.

        The transfer works on its own duplicates of the socket and file fds: the caller may close
        theirs as soon as this returns (a stream transport closing its socket cannot redirect it).
        With asyncio streams, whatever went through the StreamWriter must be written out first:
        ``writer.transport.set_write_buffer_limits(0)`` once, then ``await writer.drain()`` (with
        the default limits drain() returns while up to 64 KiB are still buffered).
        """
        self._check_open()
        return self._adopt(self.ring.sendfile(sock, file, offset, count, mode=mode, headers=headers,
                                              trailers=trailers, on_release=on_release, header=header))

    def send(self, sock, data, *, mode="auto", on_release=None):
        """Start sending the bytes-like ``data`` (``Ring.send``); returns an ``AsyncTransfer``.
        ``data`` stays pinned until the transfer settles (``await handle.released()``)."""
        self._check_open()
        return self._adopt(self.ring.send(sock, data, mode=mode, on_release=on_release))

    def stream(self, sock, size=1 << 20, *, mode="zerocopy"):
        """An ``AsyncStreamWriter`` on a registered circular buffer (``Ring.stream``)."""
        from .stream import AsyncStreamWriter
        self._check_open()
        return AsyncStreamWriter(self, sock, size, mode=mode)

    def _check_open(self):
        if self._closing or self.ring.closed:
            raise ValueError("the ring is closed")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("an AsyncRing is driven only by the event loop that created it")

    def _adopt(self, transfer):
        handle = AsyncTransfer(self, transfer)
        if not transfer.settled():
            self._active[transfer] = handle
            # called by the reaper's polls (or at once, for what already happened)
            transfer.add_done_callback(self._done)
            transfer.add_settled_callback(self._settled)
            self._schedule_reap()
        # A transfer that settled inside the call needs no reap of its own: the completions it
        # posted signalled the eventfd, which wakes the loop for anything they left behind.
        return handle

    def statistics(self):
        return self.ring.statistics()

    def close(self, timeout=None):
        """Close from the loop's thread while the loop is not running (``loop.close()`` does this
        for the rings of ``install()``): running transfers are cancelled and the ring is driven,
        blocking, until the kernel released everything or ``timeout`` (default the ring's
        ``close_timeout``) passed; memory still held then is kept alive, never freed."""
        if self.ring.closed:
            return
        if self._loop.is_running():
            raise RuntimeError("close() blocks: use 'await ring.aclose()' while the loop runs")
        self._closing = True
        self._teardown(self.ring.close_timeout if timeout is None else timeout)

    async def aclose(self, timeout=None):
        """Cancel running transfers and wait (at most ``timeout``, default the ring's
        ``close_timeout``) until the kernel released everything; then close. Memory still held
        when time runs out is kept alive by the ring, never freed."""
        if self.ring.closed:
            return
        self._closing = True
        timeout = self.ring.close_timeout if timeout is None else timeout
        try:
            for transfer in list(self._active):
                transfer.cancel()
            self._reap()
            if not self._quiet():
                self._idle = self._loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(self._idle), timeout)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._teardown(0)

    # ---- reaping -----------------------------------------------------------------------------
    def _schedule_reap(self):
        if not self._reap_due:
            self._reap_due = True
            self._loop.call_soon(self._reap)

    def _wake(self):
        self._reap()

    def _reap(self):
        self._reap_due = False
        ring = self.ring
        if ring.closed:
            return
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        # One poll reaps and advances everything; each transfer that ended or settled comes back
        # through its callbacks (_done, _settled).
        try:
            while ring.poll(0):
                pass
        except InterruptedError:
            self._schedule_reap()  # a signal arrived; its handler has run: reap again soon
        if self._idle is not None and self._quiet() and not self._idle.done():
            self._idle.set_result(None)

    def _done(self, transfer):
        handle = self._active.get(transfer)
        if handle is not None:
            handle._resolve(handle._done_waiters)

    def _settled(self, transfer):
        handle = self._active.pop(transfer, None)
        if handle is not None:
            handle._resolve(handle._settled_waiters)

    def _quiet(self):
        return not self._active and self.ring.driver.idle()

    def _teardown(self, timeout):
        """Close the ring (cancelling what runs, then waiting at most ``timeout`` s for the
        kernel's completions and notifications: what is left is kept alive), then the eventfd."""
        try:
            self.ring.close(release_timeout=timeout)
        finally:
            self._loop.remove_reader(self._efd)
            os.close(self._efd)
        for transfer, handle in self._active.items():
            for waiters, ready in ((handle._done_waiters, transfer.done()),
                                   (handle._settled_waiters, transfer.settled())):
                if ready:
                    handle._resolve(waiters)
                else:
                    handle._fail(waiters, _closed_error())
        self._active.clear()


class AsyncTransfer:
    """One transfer on an ``AsyncRing``. ``await handle`` returns the file bytes sent (or raises
    the transfer's error); ``await handle.released()`` waits until the kernel released every
    buffer or page it used. Cancelling a task awaiting either cancels the transfer; its buffers
    stay with the ring until their release arrives, and the ring keeps reaping until then.
    Every ``Transfer`` attribute (sent, events, mode, ...) reads through."""

    def __init__(self, aring, transfer):
        self.transfer = transfer
        self._aring = aring
        self._done_waiters = []
        self._settled_waiters = []

    def __getattr__(self, name):
        return getattr(self.transfer, name)

    def __repr__(self):
        return f"<AsyncTransfer {self.transfer!r}>"

    def __await__(self):
        return self._wait(self._done_waiters, Transfer.done, Transfer.result).__await__()

    async def released(self):
        """Wait until the kernel released everything the transfer used; returns the file bytes
        released (``Transfer.released``)."""
        if self.transfer.mode == "splice":
            self.transfer.released(0)  # raises ReleaseNotReported: splice never reports one
        return await self._wait(self._settled_waiters, Transfer.settled, Transfer.released)

    def cancel(self):
        """Cancel the transfer (``Transfer.cancel``); awaiting it then raises TransferCancelled."""
        if not self._aring.closed:  # a closed ring already cancelled everything it ran
            self.transfer.cancel()
            self._aring._schedule_reap()

    async def _wait(self, waiters, ready, outcome):
        transfer = self.transfer
        if self._aring.closed and not ready(transfer):
            raise _closed_error()
        if not ready(transfer):
            waiter = self._aring._loop.create_future()
            waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
        return outcome(transfer, 0)

    def _resolve(self, waiters):
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()

    def _fail(self, waiters, error):
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        waiters.clear()


def _ring(entries, setup_flags, options):
    """A Ring with ``setup_flags``, or with the first of the core's flag sets without
    DEFER_TASKRUN that the kernel accepts."""
    if setup_flags is not None:
        return Ring(entries, setup_flags=setup_flags, **options)
    attempts = [flags for flags in SETUP_ATTEMPTS if not flags & _DEFER]
    for flags in attempts[:-1]:
        try:
            return Ring(entries, setup_flags=flags, **options)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this kernel lacks one of these flags
                raise
    return Ring(entries, setup_flags=attempts[-1], **options)


def _closed_error():
    return ValueError("the ring was closed before this transfer settled")


async def sendfile(sock, file, offset=0, count=None, *, mode="auto", headers=None, trailers=None,
                   on_release=None, ring=None, header=None):
    """Send and wait until every buffer or page is released (splice: until sent); returns the
    number of file bytes sent. ``ring``: an ``AsyncRing`` to use; without one, a ring is made for this
    call and closed after it (a cancelled call still waits, bounded, for the kernel's releases)."""
    own = ring is None
    if own:
        ring = AsyncRing(64)
    try:
        handle = ring.sendfile(sock, file, offset, count, mode=mode, headers=headers,
                               trailers=trailers, on_release=on_release, header=header)
        if handle.mode != "splice":
            await handle.released()
        return await handle
    finally:
        if own:
            await ring.aclose()


from ._aioinstall import (  # noqa: E402 - install() makes AsyncRings: defined above
    InstallStatistics, SendfileScope, install, install_statistics, sendfile_options, uninstall)

__all__ = ["AsyncRing", "AsyncTransfer", "sendfile", "install", "uninstall", "sendfile_options",
           "install_statistics", "InstallStatistics", "SendfileScope"]
