"""Lifetime faults: a transfer dropped by its caller, fork(), a foreign thread, a ring closed with
notifications pending, and signals arriving while the owner waits."""
import gc
import os
import select
import signal
import threading
import weakref

import pytest

import uringsend
from uringsend import Ring, RingOwnerError, TransferCancelled

from helpers import ENGINE_MODES, Receiver, sha, tcp_pair
from _faults import assert_clean, small_buffers, small_ring

LIBRARY = os.path.dirname(uringsend.__file__)


# ---- 11. the caller drops its Transfer mid-flight ---------------------------------------------
@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_dropped_transfer_keeps_its_buffers_and_completes(mode, make_file):
    path, data = make_file(2 << 20)
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    gate = threading.Event()
    rx = Receiver(peer, gate)
    try:
        with small_ring() as ring:
            t = ring.sendfile(client, path, mode=mode)
            ring.poll(0)
            gone = weakref.ref(t)
            del t
            gc.collect()
            st = ring.statistics()
            assert st.transfers_active == 1 and st.pending_ops > 0, st
            if mode == "zerocopy":
                assert st.buffers_free < st.buffers_total, st
            gate.set()
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        gc.collect()
        assert gone() is None, "a settled transfer is still referenced by the ring"
        client.close()
        got = rx.join()
    finally:
        gate.set()
        client.close()
        peer.close()
    assert sha(got) == sha(data)


# ---- 12. fork() with transfers in flight -------------------------------------------------------
def test_fork_child_cannot_touch_the_ring_and_parent_completes(make_file):
    path, data = make_file(2 << 20)
    pairs = [tcp_pair(rcvbuf=4096) for _ in ENGINE_MODES]
    for client, _ in pairs:
        small_buffers(client)  # an autotuned send buffer would take the whole file at once
    gate = threading.Event()
    receivers = [Receiver(peer, gate) for _, peer in pairs]
    try:
        with small_ring() as ring:
            transfers = [ring.sendfile(client, path, mode=mode) for (client, _), mode in zip(pairs, ENGINE_MODES)]
            ring.poll(0)
            assert not any(t.done() for t in transfers)
            pid = os.fork()
            if pid == 0:  # the child: every use of the parent's ring must refuse, touching nothing
                failures = 0  # bit i: use i did not raise RingOwnerError
                for i, use in enumerate((lambda: ring.sendfile(pairs[0][0], path, mode="copy"),
                            lambda: ring.poll(0),
                            lambda: transfers[0].result(1),
                            lambda: transfers[1].cancel(),
                            lambda: ring.run_until_complete(1),
                            lambda: ring.register_eventfd(0))):
                    try:
                        use()
                    except RingOwnerError:
                        continue
                    except BaseException:
                        pass
                    failures |= 1 << i
                os._exit(failures)
            gate.set()
            ring.wait(transfers, timeout=30, released=False)
            assert [t.result(0) for t in transfers] == [len(data)] * len(ENGINE_MODES)
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        _, status = os.waitpid(pid, 0)
        failed = os.waitstatus_to_exitcode(status)
        names = ["sendfile", "poll", "wait", "cancel", "run_until_complete", "register_eventfd"]
        assert failed == 0, f"in the child, no RingOwnerError from: {[n for i, n in enumerate(names) if failed >> i & 1]}"
        for client, _ in pairs:
            client.close()
        for rx in receivers:
            assert sha(rx.join()) == sha(data)
    finally:
        gate.set()
        for client, peer in pairs:
            client.close()
            peer.close()


# ---- 13. a thread that does not own the ring ---------------------------------------------------
def test_foreign_thread_gets_ring_owner_error_promptly(make_file):
    path, data = make_file(2 << 20)
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    gate = threading.Event()
    rx = Receiver(peer, gate)
    efd = os.eventfd(0)
    try:
        with small_ring() as ring:
            t = ring.sendfile(client, path, mode="mmap")
            ring.poll(0)
            uses = {
                "sendfile": lambda: ring.sendfile(client, path, mode="copy"),
                "poll": lambda: ring.poll(0),
                "wait": lambda: t.result(1),
                "wait_released": lambda: t.released(1),
                "ring.wait": lambda: ring.wait([t], 1),
                "run_until_complete": lambda: ring.run_until_complete(1),
                "cancel": t.cancel,
                "register_eventfd": lambda: ring.register_eventfd(efd),
                "close": ring.close,
            }
            outcome = {}

            def foreign():
                for name, use in uses.items():
                    try:
                        use()
                        outcome[name] = "returned"
                    except RingOwnerError:
                        outcome[name] = "RingOwnerError"
                    except BaseException as exc:
                        outcome[name] = repr(exc)

            th = threading.Thread(target=foreign)
            th.start()
            th.join(10)
            assert not th.is_alive(), "a foreign thread hung on the ring"
            assert outcome == {name: "RingOwnerError" for name in uses}
            # the owner's transfer is untouched: not cancelled, nothing lost
            gate.set()
            assert t.released(timeout=30) == len(data)
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        client.close()
        got = rx.join()
    finally:
        os.close(efd)
        gate.set()
        client.close()
        peer.close()
    assert sha(got) == sha(data)


# ---- 14. closing a ring with notifications pending (kernel fact 18) -------------------------
@pytest.mark.parametrize("mode", ["zerocopy", "mmap"])
def test_close_with_notifs_pending_keeps_memory_and_never_sends_stale_bytes(mode, make_file):
    path1, data1 = make_file(2 << 20, "first.bin")
    path2, data2 = make_file(1 << 20, "second.bin")
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    try:
        ring = small_ring(close_timeout=0.3)
        t1 = ring.sendfile(client, path1, mode=mode)
        while not select.select([peer], [], [], 0)[0]:
            ring.poll(timeout=1)
        with pytest.warns(ResourceWarning):
            ring.close()
        assert ring.statistics().kept_alive > 0
        assert t1.done() and isinstance(t1.error, TransferCancelled) and not t1.settled()
        sent1 = t1.sent
        # A new ring, the same connection: its bytes follow exactly the first transfer's.
        with small_ring() as ring2:
            t2 = ring2.sendfile(client, path2, mode=mode)
            rx = Receiver(peer)  # only now does the peer read
            assert t2.released(timeout=30) == len(data2)
            ring2.run_until_complete(timeout=30)
            assert_clean(ring2)
        client.close()
        got = rx.join()
    finally:
        client.close()
        peer.close()
    assert len(got) == sent1 + len(data2)
    assert sha(got) == sha(data1[:sent1] + data2)


# ---- 15. signals while the owner waits -------------------------------------------------------
@pytest.mark.parametrize("mode", ["splice", "mmap"])
def test_timer_signals_during_wait_resume_it_and_lose_nothing(mode, make_file):
    """SIGALRM from an interval timer while the owner waits on a stalled transfer: io_uring_enter
    returns EINTR, the handler runs, the wait goes on; the peer reads after the third one."""
    path, data = make_file(4 << 20)
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    gate = threading.Event()
    rx = Receiver(peer, gate)
    alarms = 0

    def on_alarm(signum, frame):
        nonlocal alarms
        alarms += 1
        if alarms == 3:
            signal.setitimer(signal.ITIMER_REAL, 0)
            gate.set()

    saved_timer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's, if any
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with small_ring() as ring:
            t = ring.sendfile(client, path, mode=mode)
            signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
            assert t.result(timeout=30) == len(data)
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        client.close()
        got = rx.join()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        signal.setitimer(signal.ITIMER_REAL, *saved_timer)
        gate.set()
        client.close()
        peer.close()
    assert alarms == 3
    assert sha(got) == sha(data)


KICKS = 500


def test_signal_from_another_thread_runs_its_handler_promptly_during_wait(make_file):
    """Another thread signals the waiting owner (pthread_kill) KICKS times, each time once the
    handler ran for the previous one. The GIL hands over to the sender just as the owner enters
    the kernel wait, so a signal landing between the wait's last check and io_uring_enter must
    still interrupt it, rather than leave its handler pending until a completion arrives."""
    path, data = make_file(4 << 20)
    # Above the loopback MSS: with a smaller receive buffer the peer sends no window update when
    # it resumes reading, and the sender waits for its backed-off zero-window probe (~27 s).
    client, peer = tcp_pair(rcvbuf=256 << 10)
    small_buffers(client)
    gate = threading.Event()
    rx = Receiver(peer, gate)
    ack = threading.Semaphore(0)
    late = []

    def on_usr1(signum, frame):
        ack.release()

    def kick(main):
        try:
            for i in range(KICKS):
                signal.pthread_kill(main, signal.SIGUSR1)
                if not ack.acquire(timeout=5):
                    late.append(i)
                    return
        finally:
            gate.set()  # the peer reads: the wait ends (and a pending handler runs) either way

    old = signal.signal(signal.SIGUSR1, on_usr1)
    kicker = threading.Thread(target=kick, args=(threading.get_ident(),))
    try:
        with small_ring() as ring:
            t = ring.sendfile(client, path, mode="splice")
            kicker.start()
            assert t.result(timeout=60) == len(data)
            kicker.join()
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        client.close()
        got = rx.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
        gate.set()
        client.close()
        peer.close()
    assert late == [], f"signal {late} waited > 5 s for its handler: the owner slept through it"
    assert sha(got) == sha(data)


class Interrupt(Exception):
    pass


def test_raising_handler_propagates_out_of_wait_then_wait_resumes(make_file):
    path, data = make_file(4 << 20)
    client, peer = tcp_pair(rcvbuf=4096)
    small_buffers(client)
    gate = threading.Event()
    rx = Receiver(peer, gate)

    armed = False
    fired = threading.Event()

    def interrupt(signum, frame):
        nonlocal armed
        if armed:
            armed = False
            fired.set()
            raise Interrupt()

    def kick(main):
        while not fired.wait(0.05):  # until one lands while the owner is inside wait()
            signal.pthread_kill(main, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, interrupt)
    kicker = threading.Thread(target=kick, args=(threading.get_ident(),))
    try:
        with small_ring() as ring:
            t = ring.sendfile(client, path, mode="mmap")
            kicker.start()
            armed = True
            with pytest.raises(Interrupt):
                t.result(timeout=30)
            kicker.join()
            signal.signal(signal.SIGUSR1, old)
            assert not t.done()
            gate.set()
            assert t.result(timeout=30) == len(data)
            ring.run_until_complete(timeout=30)
            assert_clean(ring)
        client.close()
        got = rx.join()
    finally:
        fired.set()
        signal.signal(signal.SIGUSR1, old)
        gate.set()
        client.close()
        peer.close()
    assert sha(got) == sha(data)


# The owner's wait loop: Driver.run_until, and Core.run around the engine's wait (a signal that
# interrupts the wait in the kernel has its handler run in Core.run, as the C call returns).
WAIT_LOOP = {(os.path.join(LIBRARY, "_driver.py"), "run_until"), (os.path.join(LIBRARY, "_lowlevel.py"), "run")}


def test_handler_raising_anywhere_in_wait_never_wedges_the_ring(make_file):
    """A KeyboardInterrupt-like exception may surface in the owner's wait loop (where a Ctrl-C
    lands: the owner spends its waits there). After each one the caller waits again: every transfer
    must still end, with exact bytes. SIGALRM fires every 0.5 ms of wall time, asleep in the
    kernel or not; its handler raises when it lands in the wait loop. (An exception raised at an arbitrary bytecode inside the
    reaper's dispatch can leave that one transfer inconsistent: Python code cannot be made safe
    against asynchronous exceptions everywhere; the README says so.)"""
    path, data = make_file(256 << 10)
    client, peer = tcp_pair()
    rx = Receiver(peer)
    armed = False
    interrupts = 0

    def interrupt(signum, frame):
        if armed and (frame.f_code.co_filename, frame.f_code.co_name) in WAIT_LOOP:
            raise Interrupt()

    def waiting(call):
        nonlocal armed, interrupts
        armed = True
        try:
            for _ in range(10_000):
                try:
                    return call()
                except Interrupt:
                    interrupts += 1
            raise AssertionError("10 000 interrupted waits in a row")
        finally:
            armed = False

    saved_timer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's, if any
    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        # every op moves 4 KiB: many CQEs and engine steps for the signal to land in
        with open(path, "rb") as f, Ring(buffers=8, buffer_size=4096, chunk_size=4096,
                                         copy_chunk_size=4096, pipe_size=4096, close_timeout=1) as ring:
            for i in range(100):
                t = ring.sendfile(client, f, mode=ENGINE_MODES[i % len(ENGINE_MODES)])
                assert waiting(lambda: t.result(timeout=5)) == len(data)
            waiting(lambda: ring.run_until_complete(timeout=10))
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert_clean(ring)
        client.close()
        got = rx.join()
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        signal.setitimer(signal.ITIMER_REAL, *saved_timer)
        client.close()
        peer.close()
    assert interrupts > 20
    assert sha(got) == sha(data * 100)
