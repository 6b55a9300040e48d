"""Soak: many small transfers of every mode on one ring, with 1% injected peer resets. Every
transfer is accounted for, every byte checked, and nothing grows: fds, pipes, threads, memory."""
import collections
import errno
import gc
import hashlib
import random
import threading
import time

import psutil
import pytest

from uringsend import Ring

from helpers import ENGINE_MODES, Sink, io_wq_workers, reset, tcp_pair
from _faults import assert_clean, small_buffers

CONNECTIONS = 32
MAX_WORKERS = 8
RESET_RATE = 0.01


def _usage(proc, ring):
    st = ring.statistics()
    return {
        "rss": proc.memory_info().rss,
        # idle pooled pipes come and go (2 fds each); everything else must stay put
        "fds": proc.num_fds() - 2 * st.pipes_idle,
        "threads": threading.active_count(),
        "os_threads": proc.num_threads() - io_wq_workers(),
        "pipes_created": st.pipes_created,
    }


def _soak(total, make_file):
    path, data = make_file(64 << 10)
    pairs = [tcp_pair() for _ in range(CONNECTIONS)]
    sink = Sink([peer for _, peer in pairs], keep=False)
    expected = [hashlib.sha256() for _ in pairs]
    expected_len = [0] * len(pairs)
    rng = random.Random(2024)
    proc = psutil.Process()
    outcomes = collections.Counter()
    resetting = []  # (transfer, client socket) on connections whose peer resets
    started = 0

    def run(ring, f, n):
        """Start n transfers, as many at once as there are connections; return when all ended."""
        nonlocal started
        stop = started + n
        active = {}  # connection index -> (transfer, offset)
        while started < stop or active or resetting:
            for i, (client, _) in enumerate(pairs):
                if i in active or started >= stop:
                    continue
                mode = ENGINE_MODES[started % len(ENGINE_MODES)]
                started += 1
                if rng.random() < RESET_RATE:
                    # a fresh connection whose peer resets before or during the transfer
                    c, p = tcp_pair(rcvbuf=4096)
                    small_buffers(c)
                    if started % 2:
                        reset(p)
                        t = ring.sendfile(c, f, mode=mode)
                    else:
                        t = ring.sendfile(c, f, mode=mode)
                        ring.poll(0)
                        reset(p)
                    resetting.append((t, c))
                    continue
                offset = rng.randrange(len(data))
                count = rng.randrange(1, 16 << 10)
                active[i] = (ring.sendfile(client, f, offset, count, mode=mode), offset)
            ring.poll(timeout=5)
            for i, (t, offset) in list(active.items()):
                if t.done():
                    sent = t.result(0)  # raises if a healthy connection failed
                    assert sent == min(t.count, len(data) - offset)
                    expected[i].update(data[offset:offset + sent])
                    expected_len[i] += sent
                    outcomes["completed"] += 1
                    del active[i]
            for item in list(resetting):
                t, c = item
                if t.done():
                    try:
                        t.result(0)
                        outcomes["reset but completed"] += 1
                    except OSError as exc:
                        assert exc.errno in (errno.ECONNRESET, errno.EPIPE), exc
                        outcomes["reset"] += 1
                    c.close()
                    resetting.remove(item)
        ring.run_until_complete(timeout=30)
        gc.collect()
        return _usage(proc, ring)

    try:
        with open(path, "rb") as f, Ring(buffers=16, buffer_size=16 << 10, chunk_size=16 << 10,
                                         copy_chunk_size=16 << 10, pipe_size=16 << 10,
                                         max_workers=MAX_WORKERS) as ring:
            warmup = max(500, total // 50)
            baseline = run(ring, f, warmup)  # pools, caches and io-wq workers exist from here on
            began = time.perf_counter()
            end = run(ring, f, total - warmup)
            elapsed = time.perf_counter() - began
            assert_clean(ring)
            stats = ring.statistics()
        for client, _ in pairs:
            client.close()
        got = sink.join()
    finally:
        for t, c in resetting:
            c.close()
        for client, peer in pairs:
            client.close()
            peer.close()
    measured = total - warmup
    print(f"\nsoak: {measured} transfers after {warmup} of warm-up in {elapsed:.1f} s "
          f"({measured / elapsed:.0f}/s); {dict(outcomes)}; start {baseline}; end {end}; "
          f"{stats.completions} completions, {stats.notifs} notifs")
    assert sum(outcomes.values()) == total
    assert outcomes["reset"] >= 1 and outcomes["reset but completed"] == 0, outcomes
    for i, (n, digest) in enumerate(got):
        assert (n, digest) == (expected_len[i], expected[i].hexdigest()), f"connection {i}"
    assert end["rss"] - baseline["rss"] <= 8 << 20, (baseline, end)
    assert end["fds"] == baseline["fds"], (baseline, end)
    assert end["threads"] == baseline["threads"] and end["os_threads"] == baseline["os_threads"], (baseline, end)
    assert io_wq_workers() <= 2 * MAX_WORKERS  # bounded and unbound io-wq pools
    # Pipes are pooled: a new one only when more splice transfers run at once than the pool keeps.
    assert end["pipes_created"] - baseline["pipes_created"] < measured // 50, (baseline, end)


def test_soak_small_transfers_with_resets(make_file):
    _soak(8_000, make_file)


@pytest.mark.slow
def test_soak_100k_small_transfers_with_resets(make_file):
    _soak(100_000, make_file)
