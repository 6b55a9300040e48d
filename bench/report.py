"""Ratios against blocking splice, the targets, the Markdown table, the plots, the files."""
import json
import os
import shutil
import sys

from uringsend import measure
from uringsend.measure import ratio

REF = measure.REFERENCE
SENDFILE = measure.SENDFILE
THREADS = "splice-threads"


def loopback_note(result):
    rows = [row for rows in result["latency"].values() for row in rows.values()]
    rows += list(result["throughput"].values()) + list(result["cost"].values())
    rows += [row for rows in result["concurrency"].values() for row in rows.values()]
    copied = sum(row.get("chunks_copied", 0) for row in rows)
    zerocopy = sum(row.get("chunks_zerocopy", 0) for row in rows)
    return (f"Loopback copies SEND_ZC data: of {copied + zerocopy} SEND_ZC notifications in this run, "
            f"{copied} said *copied* and {zerocopy} zero-copy. Zero-copy gains need a real NIC; on "
            "loopback 'zerocopy' and 'mmap' pay for pinning and notifications without saving a copy "
            "('zerocopy' even adds one: the READ_FIXED into its registered buffer).")


def size_label(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def add_ratios(result):
    """ratio_*_vs_splice fields in every row (latency and p99: lower is better; throughput:
    higher is better). The cost per transfer comes with its ratios (``uringsend.measure``)."""
    measure.add_latency_ratios(result["latency"])
    thr = result["throughput"]
    for row in thr.values():
        row["ratio_throughput_vs_splice"] = ratio(row["gbps"], thr[REF]["gbps"])
    cost = result["cost"]
    for row in cost.values():
        row["ratio_cpu_vs_splice"] = ratio(row["cpu_s_per_gb"], cost[REF]["cpu_s_per_gb"])
    for rows in result["concurrency"].values():
        ref = rows[THREADS]
        for row in rows.values():
            row["ratio_throughput_vs_splice"] = ratio(row["gbps"], ref["gbps"])
            row["ratio_requests_vs_splice"] = ratio(row["requests_per_s"], ref["requests_per_s"])
            row["ratio_p99_vs_splice"] = ratio(row.get("p99_us"), ref.get("p99_us"))


def fastest(result):
    """The uringsend mode with the lowest p50 at each size (all modes, and stable ones only), and
    the best streaming mode: what 'auto' should pick."""
    modes = [f"uringsend-{m}" for m in measure.URING_MODES if m != "auto"]
    stable = [m for m in modes if measure.is_stable(m)]
    lat = result["latency"]
    out = {"latency_p50": {}, "latency_p50_stable": {}}
    for size in result["config"]["sizes"]:
        key = str(size)
        for field, pool in (("latency_p50", modes), ("latency_p50_stable", stable)):
            have = [m for m in pool if lat[m][key].get("p50_us") is not None]
            out[field][key] = min(have, key=lambda m: lat[m][key]["p50_us"])
    thr = result["throughput"]
    out["throughput"] = max(modes, key=lambda m: thr[m]["gbps"])
    out["throughput_stable"] = max(stable, key=lambda m: thr[m]["gbps"])
    return out


def _target(name, ok, measured, value):
    return {"target": name, "status": "PASS" if ok else "MISS", "measured": measured, "ratio": value}


LATENCY_LIMITS = {4096: 1.0, 65536: 1.1}  # best stable mode's p50 and p99 vs blocking splice


def targets(result):
    out = []
    lat = result["latency"]
    stable = [f"uringsend-{m}" for m in measure.STABLE_MODES]
    uring = [f"uringsend-{m}" for m in measure.URING_MODES]
    for size, limit in LATENCY_LIMITS.items():
        key = str(size)
        if key not in lat[REF]:
            continue
        best = min(stable, key=lambda m: max(lat[m][key]["ratio_p50_vs_splice"], lat[m][key]["ratio_p99_vs_splice"]))
        r50, r99 = lat[best][key]["ratio_p50_vs_splice"], lat[best][key]["ratio_p99_vs_splice"]
        out.append(_target(f"{size_label(size)} latency: best stable mode p50 and p99 <= {limit:.1f}x blocking splice",
                           r50 <= limit and r99 <= limit, f"{best}: p50 {r50:.2f}x, p99 {r99:.2f}x", max(r50, r99)))
    thr = result["throughput"]
    stream = size_label(result["config"]["stream_size"])
    for pool, which, limit in ((uring, "best mode", 1.0), (stable, "best stable mode", 0.6)):
        best = max(pool, key=lambda m: thr[m]["ratio_throughput_vs_splice"])
        r = thr[best]["ratio_throughput_vs_splice"]
        out.append(_target(f"{stream} throughput: {which} >= {limit:.1f}x blocking splice", r >= limit,
                           f"{best}: {thr[best]['gbps']:.2f} vs {thr[REF]['gbps']:.2f} GB/s ({r:.2f}x)", r))
    conc = result["concurrency"]
    most = str(max(result["config"]["clients"]))
    rows = conc[most]
    best = max((k for k in rows if k != THREADS), key=lambda m: rows[m]["ratio_requests_vs_splice"])
    r, r99 = rows[best]["ratio_requests_vs_splice"], rows[best]["ratio_p99_vs_splice"]
    out.append(_target(f"{most} clients: one uringsend thread >= 1.5x the requests/s of thread-per-client "
                       "splice, p99 <= 1.0x", r >= 1.5 and r99 <= 1.0,
                       f"{best}: {rows[best]['requests_per_s']} vs {rows[THREADS]['requests_per_s']} requests/s "
                       f"({r:.2f}x), p99 {r99:.2f}x", r))
    per = result["cost_per_transfer"]
    copy = per["uringsend-copy"]["4096"]
    for ref, field, label, limit in ((REF, "ratio_cpu_vs_splice", "blocking splice", 1.0),
                                     (SENDFILE, "ratio_cpu_vs_sendfile", "os.sendfile", 1.2)):
        r = copy[field]
        out.append(_target(f"4 KiB cost per transfer: copy <= {limit:.1f}x {label}", r <= limit,
                           f"{copy['cpu_us']:.1f} vs {per[ref]['4096']['cpu_us']:.1f} µs CPU ({r:.2f}x)", r))
    oneshot = per[measure.ONESHOT]
    worst = max(oneshot, key=lambda size: oneshot[size]["ratio_cpu_vs_sendfile"])
    r = oneshot[worst]["ratio_cpu_vs_sendfile"]
    out.append(_target("cost per transfer: uringsend.sendfile() <= 1.3x os.sendfile (4 KiB and 64 KiB)", r <= 1.3,
                       "; ".join(f"{size_label(int(size))}: {row['cpu_us']:.1f} vs {per[SENDFILE][size]['cpu_us']:.1f} "
                                 f"µs CPU ({row['ratio_cpu_vs_sendfile']:.2f}x)" for size, row in oneshot.items()), r))
    cost = result["cost"]
    moved = size_label(result["config"]["stream_size"] * result["config"]["cost_reps"])
    worst = max(uring, key=lambda m: cost[m]["rss_peak_growth_mib"])
    growth = cost[worst]["rss_peak_growth_mib"]
    out.append(_target(f"peak RSS growth while sending {moved} <= 16 MiB (every uringsend mode)", growth <= 16,
                       f"worst {worst}: {growth:.1f} MiB (anonymous {cost[worst]['rss_anon_peak_growth_mib']:.1f}, "
                       f"file and shmem pages mapped {cost[worst]['rss_file_peak_growth_mib']:.1f})", round(growth / 16, 3)))
    mem = result.get("memory_stream")
    if mem:
        r = mem["writer"]["ratio_gbps_vs_sendall"]
        out.append(_target(f"{size_label(mem['writer']['bytes'])} from memory: stream writer (release accounting "
                           "on) >= 0.9x socket.sendall's GB/s", r >= 0.9,
                           f"{mem['writer']['gbps']:.2f} vs {mem['sendall']['gbps']:.2f} GB/s ({r:.2f}x); CPU "
                           f"{mem['writer']['cpu_s_per_gb']:.3f} vs {mem['sendall']['cpu_s_per_gb']:.3f} s/GB", r))
    leaks = {m: cost[m]["fds_after"] - cost[m]["fds_before"] for m in uring}
    run = result["fds"]["end"] - result["fds"]["start"]
    worst = max(leaks, key=leaks.get)
    out.append(_target("open fds flat (each sender closed, and the whole run)",
                       leaks[worst] == 0 and run == 0,
                       f"largest change {leaks[worst]:+d} ({worst}); whole run {run:+d}", None))
    return out


def _f(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def _x(value):
    return "–" if value is None else f"{value:.2f}x"


def _zc(row):
    if "chunks_copied" not in row or row["chunks_copied"] + row["chunks_zerocopy"] == 0:
        return "–"
    return f"{row['chunks_copied']}/{row['chunks_zerocopy']}"


def markdown(result):
    m = result["machine"]
    cfg = result["config"]
    lines = [
        f"## uringsend benchmark — {m['host']}, {result['created']}",
        "",
        f"{m['cpu_model']}, {m['cores_logical']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"uringsend {m['uringsend']} at {m['uringsend_commit']} (ring flags {'|'.join(m['io_uring_setup_flags'] or [])}); "
        f"load average {m['loadavg_start']} at start, {result['loadavg_end']} at end. "
        f"Loopback TCP, client in another process, files warm in the page cache. "
        f"Command: `{result['command']}`",
        "",
        "### Latency: request sent → last byte received by the client (µs)",
        "",
        "| size | contender | p50 | p99 | p99.9 | p50 vs splice | p99 vs splice | submit → all released p50 / p99 | ZC notifs copied/zero-copy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in cfg["sizes"]:
        for name in result["contenders"]:
            row = result["latency"][name][str(size)]
            rel = result["release"].get(name, {}).get(str(size))
            rel = f"{_f(rel['p50_us'])} / {_f(rel['p99_us'])}" if rel else "–"
            lines.append(f"| {size_label(size)} | {name} | {_f(row['p50_us'])} | {_f(row['p99_us'])} | "
                         f"{_f(row['p999_us'])} | {_x(row['ratio_p50_vs_splice'])} | "
                         f"{_x(row['ratio_p99_vs_splice'])} | {rel} | {_zc(row)} |")
    per = result["cost_per_transfer"]
    lines += [
        "",
        "### Cost per transfer: the sender's CPU µs per transfer (process CPU time, io-wq workers included; "
        f"the reader, in another process, reads and discards), median of {cfg['rounds']} rotated "
        f"round(s), {cfg['cost_transfer_seconds']} s in all",
        "",
        "| size | contender | CPU µs | thread CPU µs | wall µs | CPU vs splice | CPU vs os.sendfile | transfers |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in cfg["cost_transfer_sizes"]:
        for name, rows in per.items():
            row = rows[str(size)]
            lines.append(f"| {size_label(size)} | {name} | {_f(row['cpu_us'], 2)} | {_f(row['thread_cpu_us'], 2)} | "
                         f"{_f(row['wall_us'], 2)} | {_x(row['ratio_cpu_vs_splice'])} | "
                         f"{_x(row['ratio_cpu_vs_sendfile'])} | {row['transfers']} |")
    lines += [
        "",
        f"### Throughput and cost: one {size_label(cfg['stream_size'])} file per request "
        f"(median of {cfg['stream_reps']}); cost over {size_label(cfg['stream_size'] * cfg['cost_reps'])}",
        "",
        "| contender | GB/s | best GB/s | vs splice | server CPU s/GB | peak RSS growth MiB (anon / file+shmem) "
        "| fds before → open → closed | ZC notifs copied/zero-copy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in result["contenders"]:
        t, c = result["throughput"][name], result["cost"][name]
        lines.append(f"| {name} | {t['gbps']:.2f} | {t['gbps_best']:.2f} | {_x(t['ratio_throughput_vs_splice'])} | "
                     f"{c['cpu_s_per_gb']:.3f} | {c['rss_peak_growth_mib']:.1f} ({c['rss_anon_peak_growth_mib']:.1f} / "
                     f"{c['rss_file_peak_growth_mib']:.1f}) | {c['fds_before']} → {c['fds_open']} → {c['fds_after']} | {_zc(t)} |")
    lines += [
        "",
        f"### Concurrency: clients fetching {size_label(cfg['concurrency_size'])} back to back for "
        f"{cfg['concurrency_duration']} s; thread-per-client blocking splice vs one uringsend thread "
        "(selector for requests, one ring for responses)",
        "",
        "| clients | server | GB/s | requests/s | p50 µs | p99 µs | GB/s vs splice | p99 vs splice | server CPU s/GB | ZC notifs copied/zero-copy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, rows in result["concurrency"].items():
        for name, row in rows.items():
            lines.append(f"| {n} | {name} | {row['gbps']:.2f} | {row['requests_per_s']} | {_f(row.get('p50_us'))} | "
                         f"{_f(row.get('p99_us'))} | {_x(row['ratio_throughput_vs_splice'])} | "
                         f"{_x(row['ratio_p99_vs_splice'])} | {_f(row['cpu_s_per_gb'], 3)} | {_zc(row)} |")
    mem = result.get("memory_stream")
    if mem:
        w = mem["writer"]
        lines += [
            "",
            f"### Streaming from memory: {size_label(w['bytes'])} of in-memory data in {size_label(w['chunk'])} "
            f"writes per request (median of {w['reps']} alternating rounds); every byte released before the "
            "next request",
            "",
            "| sender | GB/s | vs sendall | sender CPU s/GB | CPU vs sendall | notes |",
            "|---|---:|---:|---:|---:|---|",
        ]
        notes = {"writer": f"Ring.stream, {size_label(w['buffer'])} registered buffer, write() copies in, "
                           f"SEND_ZC out; released {size_label(w['copied'])} copied, "
                           f"{size_label(w['zerocopy'])} zero-copy; waited {w['waits']} times",
                 "writer-auto": "the same writer, mode 'auto' (SEND_ZC, then SEND once the kernel reports copying)",
                 "writer-copy": "the same writer, mode 'copy' (SEND from the buffer)",
                 "sendall": "socket.sendall per chunk",
                 "ring-send-copy": "ring.send(chunk, mode='copy'), one at a time"}
        for name, row in mem.items():
            lines.append(f"| {name} | {row['gbps']:.2f} | {_x(row['ratio_gbps_vs_sendall'])} | "
                         f"{row['cpu_s_per_gb']:.3f} | {_x(row['ratio_cpu_vs_sendall'])} | {notes.get(name, '')} |")
    best = result["fastest"]
    lines += ["", "### Fastest uringsend mode (lowest p50; 'auto' excluded, it is what this decides)", "",
              "| size | any mode | stable mode |", "|---|---|---|"]
    for size in cfg["sizes"]:
        lines.append(f"| {size_label(size)} | {best['latency_p50'][str(size)]} | "
                     f"{best['latency_p50_stable'][str(size)]} |")
    lines.append(f"| {size_label(cfg['stream_size'])} stream | {best['throughput']} | {best['throughput_stable']} |")
    lines += ["", "### Targets", ""]
    for t in result["targets"]:
        lines.append(f"- **{t['status']}** {t['target']}: {t['measured']}")
    lines += ["", loopback_note(result), ""]
    return "\n".join(lines)


STYLE = {
    "splice": dict(color="black", linewidth=2.5, marker="o"),
    "sendfile": dict(color="0.45", linestyle="--", marker="s"),
    "read-send": dict(color="0.7", linestyle="--", marker="^"),
}


def _size_axis(ax, sizes):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [size_label(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("response size (log scale)")


def plots(result, out_dir):
    """Write latency.png and throughput.png; returns their paths, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["config"]["sizes"]
    lat = result["latency"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    for ax, field, title in ((axes[0], "p50_us", "p50"), (axes[1], "p99_us", "p99")):
        for name in result["contenders"]:
            ax.plot(sizes, [lat[name][str(s)][field] for s in sizes], label=name, **STYLE.get(name, dict(marker=".")))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("response size (bytes)")
        ax.set_ylabel("µs, request sent → last byte received")
        ax.set_title(f"{title} latency (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"uringsend vs blocking splice — {result['machine']['host']}, loopback TCP")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "latency.png"), dpi=110)
    plt.close(fig)

    stream = result["config"]["stream_size"]
    xs = sizes + [stream]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in result["contenders"]:
        ys = [s / (lat[name][str(s)]["p50_us"] * 1e3) for s in sizes] + [result["throughput"][name]["gbps"]]
        ax.plot(xs, ys, label=name, **STYLE.get(name, dict(marker=".")))
    _size_axis(ax, xs)
    ax.set_ylabel("GB/s")
    ax.set_title(f"throughput: size / p50 latency; {size_label(stream)}: streamed (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=110)
    plt.close(fig)
    return [os.path.join(out_dir, n) for n in ("latency.png", "throughput.png")]


def write(result, out_dir, json_only):
    """Write <host>-<YYYYmmdd-HHMM>.json and latest.json (and latest.md and the plots). Returns
    the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{result['machine']['host']}-{result['stamp']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    shutil.copyfile(path, os.path.join(out_dir, "latest.json"))
    written = [path, os.path.join(out_dir, "latest.json")]
    if not json_only:
        with open(os.path.join(out_dir, "latest.md"), "w") as f:
            f.write(markdown(result))
        written.append(os.path.join(out_dir, "latest.md"))
        pngs = plots(result, out_dir)
        if pngs is None:
            print("plots skipped (latency.png and throughput.png not written): matplotlib is not "
                  "installed; pip install matplotlib, or pip install -e '.[bench]'", file=sys.stderr)
        else:
            written += pngs
    return written
