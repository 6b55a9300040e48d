"""python -m uringsend: probe the kernel, run the demos, compare with blocking senders, serve files.

Commands only parse arguments and format what ``uringsend.probe()``, ``uringsend.demos`` and
``uringsend.measure`` return:
aligned tables, colour only on a terminal (and never with NO_COLOR), ``--json`` for one JSON
document. The exit status is 1 when a demo's own check fails.
"""
import argparse
import errno
import json
import os
import re
import sys
import textwrap
import time

from . import demos, measure
from .errors import IoUringUnavailable
from .probe import probe
from .ring import MODES

# the opcodes uringsend's modes submit
USED_OPCODES = ("SPLICE", "TEE", "READ_FIXED", "SEND", "SEND_ZC", "POLL_ADD", "ASYNC_CANCEL")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size_arg(text):
    """'4194304', '4M', '256k', '1MiB' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) * _UNITS[m.group(2).lower()] < 1:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r} (examples: 4194304, 4M, 256k)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def human(n):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


class Out:
    """stdout with optional ANSI colour, stderr progress on a terminal only."""

    def __init__(self, stream=None, err=None):
        self.stream = stream or sys.stdout
        self.err = err or sys.stderr
        self.colour = self.stream.isatty() and not os.environ.get("NO_COLOR")
        self.live = self.err.isatty()
        self._progress_shown = False

    def paint(self, text, code):
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text

    def good(self, text, ok):
        return self.paint(text, "32" if ok else "1;31")

    def line(self, text=""):
        self.clear_progress()
        print(text, file=self.stream)

    def para(self, text):
        """A wrapped paragraph, indented like the tables."""
        for line in textwrap.wrap(text, 100, initial_indent="  ", subsequent_indent="    "):
            self.line(line)

    def title(self, text):
        self.line(self.paint(text, "1"))

    def progress(self, text):
        if self.live:
            self.err.write(f"\r\033[K{text}")
            self.err.flush()
            self._progress_shown = True

    def clear_progress(self):
        if self._progress_shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self._progress_shown = False

    def table(self, headers, rows, right=(), codes=None):
        """Aligned columns; ``right``: indexes of right-aligned columns; ``codes``: per row, a dict
        column index -> ANSI code for that cell."""
        cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        for n, r in enumerate(cells):
            parts = []
            for i, c in enumerate(r):
                last = i == len(r) - 1
                text = c.rjust(widths[i]) if i in right else (c if last else c.ljust(widths[i]))
                code = "2" if n == 0 else codes[n - 1].get(i) if codes else None
                parts.append(self.paint(text, code))
            self.line("  " + "  ".join(parts).rstrip())

    def checks(self, result):
        for c in result["checks"]:
            mark = self.good("ok  " if c["ok"] else "FAIL", c["ok"])
            self.line(f"  {mark} {c['name']}" + (f" ({c['detail']})" if c["detail"] else ""))


# ---- probe -------------------------------------------------------------------------------------
def show_probe(info, out):
    out.title(f"uringsend probe: kernel {info.kernel}")
    sysctl = info.io_uring_disabled_sysctl
    if info.io_uring:
        state = out.good("available", True)
        if sysctl is not None:
            state += f" (kernel.io_uring_disabled = {sysctl})"
    else:
        err = getattr(errno, info.get("io_uring_error", ""), None)
        why = IoUringUnavailable(err).strerror if err else info.get("io_uring_error", "unknown")
        state = out.good(f"unavailable: {why}", False)
    ops = info.opcodes
    missing = [o for o in USED_OPCODES if o not in ops]
    memlock = "soft {}, hard {}".format(*("unlimited" if v is None else human(v)
                                          for v in (info.memlock_soft, info.memlock_hard)))
    rows = [("io_uring", state),
            ("setup flags", " ".join(info.setup_flags) or "-"),
            ("modes", " ".join(info.modes) or "-"),
            ("opcodes used", "all supported" if not missing and ops else "missing: " + " ".join(missing)),
            ("pipe-max-size", f"{human(info.pipe_max_size)} ({info.pipe_max_size} bytes)"),
            ("RLIMIT_MEMLOCK", memlock + " (pages sent by SEND_ZC from a mapping count against it)"),
            ("root", "yes" if info.root else "no")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.line(f"  {k.ljust(width)}  {v}")
    out.line(f"  {'opcodes'.ljust(width)}  {len(ops)} supported:")
    per_line = 6
    colw = max((len(o) for o in ops), default=0)
    for i in range(0, len(ops), per_line):
        names = [out.paint(o.ljust(colw), "1" if o in USED_OPCODES else None) for o in ops[i:i + per_line]]
        out.line("    " + "  ".join(names).rstrip())
    return 0 if info.io_uring else 1


# ---- demos -------------------------------------------------------------------------------------
def _chunk(row):
    if row["role"] == "header":
        return "header"
    if row["offset"] is None:
        return ""
    return f"{row['offset']}..{row['offset'] + row['len']}"


def _res(row):
    if "NOTIF" in row["flags_decoded"] and row["copied"] is not None:
        return f"{row['res'] & 0xFFFFFFFF:#x}"  # the usage flag word
    return row["res"]


def show_timeline(timeline, out):
    rows = [(f"{r['t_us']:.1f}", r["op"], r["user_data"], _res(r), "|".join(r["flags_decoded"]) or "-",
             _chunk(r), r["note"]) for r in timeline]
    codes = [{6: "33" if r["copied"] else "36" if "NOTIF" in r["flags_decoded"] else None} for r in timeline]
    out.table(("µs", "op", "user_data", "res", "flags", "chunk", "what the kernel said"), rows,
              right={0, 2, 3}, codes=codes)


def show_notify(r, out):
    if r["slow_reader"]:
        pace = r["reader"]
        reader = (f"slow reader (SO_RCVBUF {human(pace['rcvbuf'])}, reads {human(pace['piece'])} "
                  f"at ~{human(pace['rate'])}/s)")
    else:
        reader = "reader as fast as it can"
    mode = r["mode"] if r["mode"] == r["requested_mode"] else f"{r['requested_mode']} (chose {r['mode']})"
    out.title(f"notify: mode {mode}, {human(r['size'])} file -> loopback TCP, {reader}")
    out.line("  one row per CQE; µs since the transfer started")
    show_timeline(r["timeline"], out)
    s = r["summary"]
    line = (f"summary: {s['bytes']} bytes in {plural(s['chunks'], 'chunk')}, "
            f"{plural(s['notifications'], 'notification')}; ")
    if r["mode"] == "splice":
        out.para(line + "splice hands page-cache pages to the socket by reference: the chunks were queued, "
                 "and the kernel never says when it lets go of them")
    else:
        out.para(line + f"released {s['released_bytes']} bytes: {plural(s['copied'], 'chunk')} copied, "
                 f"{s['zerocopy']} zero-copy; max sent->released gap {s['max_gap_us']} µs")
        if s["copied"] and r["mode"] in ("mmap", "zerocopy"):
            out.para("'copied': the kernel copied the data anyway (loopback always does); "
                     "a NIC with zero-copy support sends the pages themselves")
    out.checks(r)


def show_hazard(r, out):
    out.title(f"hazard: a {human(r['size'])} file overwritten in place after the send returned, "
              "before the peer read it")
    out.para("the peer is held back (SO_RCVBUF 4 KiB, no reading until the file was written), so the bytes "
             "are still queued in the sockets when os.pwrite() changes every byte of the file")
    out.table(("mode", "file written", "expected", "new bytes at peer", "verdict"),
              [(x["mode"], x["written"], x["expected"], f"{x['new_bytes']} / {x['bytes']}", x["verdict"])
               for x in r["rows"]],
              right={3}, codes=[{4: "33" if x["new_bytes"] else "32"} for x in r["rows"]])
    for x in r["rows"]:
        if x["written"] == "after released()":
            line = (f"when released() returned ({x['released_before_write']} bytes released), "
                    f"the peer had read {x['peer_read_before_write']} of {x['bytes']} bytes")
            if x["peer_read_before_write"] < x["bytes"]:
                line += ": a release says the kernel let go of the pages, not that the peer read them"
            out.para(line)
    out.para("note: " + r["note"])
    out.checks(r)


def show_header(r, out):
    out.title(f"header: {r['header_len']}-byte HTTP-style header + {human(r['size'])} body in one stream, "
              f"mode {r['mode']}")
    out.line("  header: " + r["header"].replace("\r\n", "\\r\\n"))
    out.table(("µs", "event", "offset", "bytes", "copied"),
              [(f"{e['t_us']:.1f}", e["kind"], "header" if e["offset"] is None else e["offset"], e["nbytes"],
                "" if e["copied"] is None else "yes" if e["copied"] else "no") for e in r["events"]],
              right={0, 2, 3}, codes=[{2: "36" if e["offset"] is None else None} for e in r["events"]])
    out.line(f"  peer: {r['peer_bytes']} bytes; its first recv() returned {r['peer_first_recv']} "
             f"(header {r['header_len']} + body {max(0, r['peer_first_recv'] - r['header_len'])})")
    out.checks(r)


def show_tee(r, out):
    out.title(f"tee: one {human(r['size'])} file to {r['sockets']} loopback sockets")
    out.table(("socket", "mode", "sent", "peer bytes", "events", "kinds", "identical"),
              [(p["socket"], p["mode"], p["sent"], p["bytes"], p["events"], " ".join(p["kinds"]),
                "yes" if p["identical"] else "NO") for p in r["peers"]],
              right={0, 2, 3, 4}, codes=[{6: "32" if p["identical"] else "1;31"} for p in r["peers"]])
    out.table(("op", "CQEs", "bytes"), [(k, v["cqes"], v["bytes"]) for k, v in r["ops"].items()],
              right={1, 2})
    out.para(f"{r['file_bytes_read']} bytes went from the file into a pipe for {r['sockets']} sockets: "
             "TEE duplicates page references between pipes, so, as with splice, every chunk is 'queued', "
             "never 'released'")
    out.checks(r)


def show_stream(r, out):
    out.title("stream: generated records through Ring.stream's registered circular buffer -> loopback TCP")
    out.para("one line each time the write position comes back to the buffer's start: the lap just written, "
             "region by region (F: in flight, the kernel may still read it; R: released, free to reuse), and "
             "how many reserves of that lap reused places of the lap before, each only after its release")
    for run in r["runs"]:
        reader = "slow reader (small socket buffers)" if run["slow_reader"] else "fast reader"
        out.line()
        out.line(f"  {human(run['size'])} buffer, {human(run['total'])} in {run['records']} records, {reader}")
        for ln in run["lines"]:
            out.line(f"    lap {ln['lap']:3d} at {human(ln['committed']):>9}  [{ln['regions']}]  in flight "
                     f"{human(ln['in_flight']):>9}  released {human(ln['released']):>9} (copied "
                     f"{human(ln['copied'])}, zero-copy {human(ln['zerocopy'])})  reused {ln['reused']:3d} after release"
                     f"  waits {ln['waits']}")
        out.line(f"    {run['reuses']} reserves reused bytes of an earlier lap, {run['early_reuses']} before "
                 f"their release; the writer waited {plural(run['waits'], 'time')} for the kernel")
    out.para("'copied': on loopback the kernel copies SEND_ZC data and says so in the notification; a NIC "
             "with zero-copy support would send the buffer's pages and release them after the peer's ACK")
    out.checks(r)


# name: (function, formatter, the function's arguments taken from the command line)
DEMOS = {
    "notify": (demos.notify, show_notify, ("mode", "size", "slow_reader", "progress")),
    "hazard": (demos.hazard, show_hazard, ("size", "progress")),
    "header": (demos.header, show_header, ("mode", "size")),
    "tee": (demos.tee, show_tee, ("sockets", "size")),
    "stream": (demos.stream, show_stream, ("size", "tiny", "total", "progress")),
}


def run_demo(args, out):
    names = [args.demo] if args.demo else list(DEMOS)
    given = dict(vars(args), progress=out.progress)  # with no demo named, each one's defaults
    results = {}
    for name in names:
        fn, show, keys = DEMOS[name]
        try:
            result = fn(**{k: given[k] for k in keys if given.get(k) is not None})
        except (OSError, TimeoutError) as exc:  # IoUringUnavailable is an OSError
            result = {"demo": name, "ok": False, "error": f"{type(exc).__name__}: {exc}", "checks": []}
        out.clear_progress()
        results[name] = result
        if args.json:
            continue
        if len(results) > 1:
            out.line()
        if "error" in result:
            out.title(f"{name}: " + out.good(f"failed: {result['error']}", False))
        else:
            show(result, out)
    ok = all(r["ok"] for r in results.values())
    if args.json:
        doc = results[args.demo] if args.demo else {"ok": ok, "demos": results}
        print(json.dumps(doc, indent=1))
    elif len(results) > 1:
        failed = [n for n, r in results.items() if not r["ok"]]
        out.line()
        out.line(out.good(f"all {len(results)} demos passed their checks" if ok
                          else "failed: " + ", ".join(failed), ok))
    return 0 if ok else 1


# ---- compare -----------------------------------------------------------------------------------
def sizes_arg(text):
    """'4K,64K' -> [4096, 65536]."""
    return [size_arg(part) for part in text.split(",")]


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not 0 < value < float("inf"):  # NaN too
            raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
        return value
    return parse


def _x(value):
    return "-" if value is None else f"{value:.2f}x"


_F1, _F2 = "{:.1f}".format, "{:.2f}".format
# section: (what it measures, its columns: (header, field, format))
COMPARE_SECTIONS = (
    ("cost_per_transfer", "cost per transfer: the sender's CPU µs (process CPU time, io-wq workers included) "
                          "while the peer reads and discards",
     (("CPU µs", "cpu_us", _F2), ("wall µs", "wall_us", _F2), ("vs splice", "ratio_cpu_vs_splice", _x),
      ("vs sendfile", "ratio_cpu_vs_sendfile", _x), ("transfers", "transfers", str))),
    ("latency", "latency: request sent -> last byte received by the client, µs",
     (("p50", "p50_us", _F1), ("p99", "p99_us", _F1), ("p50 vs splice", "ratio_p50_vs_splice", _x),
      ("p99 vs splice", "ratio_p99_vs_splice", _x), ("requests", "n", str))),
)


def show_compare(r, out):
    sizes = " and ".join(human(s) for s in r["sizes"])
    out.title(f"compare: uringsend vs blocking splice, os.sendfile and read+send; {sizes}, loopback TCP, "
              f"the peer in another process; medians of {plural(r['rounds'], 'rotated round')}")
    for section, what, columns in COMPARE_SECTIONS:
        out.line()
        out.para(what)
        rows = [(human(size), name, *(fmt(row[field]) for _, field, fmt in columns))
                for size in r["sizes"] for name, by_size in r[section].items() for row in [by_size[str(size)]]]
        out.table(("size", "contender", *(header for header, _, _ in columns)), rows,
                  right=set(range(2, 2 + len(columns))))
    out.line()
    m = r["machine"]
    out.para(f"ratios: the contender's value over blocking splice's (or os.sendfile's); below 1.00x is cheaper "
             f"or faster. Stable modes (zerocopy, mmap, copy, auto, and uringsend.sendfile) wait for every "
             f"release. Linux {m['kernel']}, {m['cores']} cores, load average {m['loadavg_start'][0]} -> "
             f"{m['loadavg_end'][0]}; {r['elapsed_s']} s.")
    return 0


def run_compare(args, out):
    began = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - began:5.1f}s] {msg}", file=out.err, flush=True)

    result = measure.compare(args.sizes, args.rounds, args.seconds, log)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    return show_compare(result, out)


def build_parser():
    as_json = argparse.ArgumentParser(add_help=False)
    # on every level (demo --json, demo notify --json); SUPPRESS keeps a subparser from resetting it
    as_json.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print one JSON document")
    parser = argparse.ArgumentParser(
        prog="python -m uringsend",
        description="Send files to sockets through io_uring, and see when the kernel released them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("probe", parents=[as_json],
                   help="what this kernel offers: opcodes, setup flags, modes, limits")
    demo = sub.add_parser("demo", parents=[as_json], help="run one demo, or all of them (no demo named)",
                          description="Run a demo over loopback TCP; with no demo named, run them all "
                                      "on defaults.")
    which = demo.add_subparsers(dest="demo", metavar="demo")
    notify = which.add_parser("notify", parents=[as_json], help="timeline of one transfer, one line per CQE")
    notify.add_argument("--mode", choices=MODES, default="mmap", help="transfer mode (default: mmap)")
    notify.add_argument("--size", type=size_arg, default=4 << 20, help="file size, e.g. 4M (default: 4 MiB)")
    notify.add_argument("--slow-reader", action="store_true",
                        help="a peer with a small SO_RCVBUF that reads slowly: the release lags the send")
    hazard = which.add_parser("hazard", parents=[as_json],
                              help="overwrite the file after the send returned, per mode")
    hazard.add_argument("--size", type=size_arg, default=256 << 10, help="file size (default: 256 KiB)")
    head = which.add_parser("header", parents=[as_json], help="a header and a file body as one stream")
    head.add_argument("--mode", choices=MODES, default="mmap", help="transfer mode (default: mmap)")
    head.add_argument("--size", type=size_arg, default=1 << 20, help="body size (default: 1 MiB)")
    tee = which.add_parser("tee", parents=[as_json], help="one file to several sockets")
    tee.add_argument("--sockets", type=int, default=3, choices=range(1, 65), metavar="N",
                     help="sockets, 1 to 64 (default: 3)")
    tee.add_argument("--size", type=size_arg, default=1 << 20, help="file size (default: 1 MiB)")
    strm = which.add_parser("stream", parents=[as_json],
                            help="records through the stream writer's circular buffer, reused after release")
    strm.add_argument("--size", type=size_arg, default=64 << 10, help="buffer size (default: 64 KiB)")
    strm.add_argument("--tiny", type=size_arg, default=8 << 10,
                      help="the second run's buffer, with a slow reader (default: 8 KiB)")
    strm.add_argument("--total", type=size_arg, default=1 << 20,
                      help="bytes of records in the first run; the second sends an eighth (default: 1 MiB)")
    compare = sub.add_parser(
        "compare", parents=[as_json],
        help="cost per transfer and latency: blocking splice, os.sendfile, read+send, every mode",
        description="Send small files over loopback TCP to a peer in another process: the sender's CPU time "
                    "per transfer and the request -> last byte latency of blocking splice, os.sendfile, "
                    "read+send, every uringsend mode and uringsend.sendfile(), with ratios to blocking splice "
                    "(and os.sendfile). Progress on stderr.")
    compare.add_argument("--sizes", type=sizes_arg, default=list(measure.SMALL_SIZES),
                         help="file sizes, comma separated (default: 4K,64K)")
    compare.add_argument("--rounds", type=positive(int), default=5,
                         help="rotated rounds; each figure is a median over them (default: 5)")
    compare.add_argument("--seconds", type=positive(float), default=20.0,
                         help="measuring time, half for each section; set-up and warm-ups come on top "
                              "(default: 20)")
    try:
        from .server import add_arguments, run
    except ImportError:
        pass  # no server in this build
    else:
        serve = sub.add_parser("serve", help="serve files over TCP")
        add_arguments(serve)
        serve.set_defaults(run=run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    out = Out()
    try:
        if args.command == "probe":
            info = probe()
            if args.json:
                print(json.dumps(info.asdict(), indent=1))
                return 0 if info.io_uring else 1
            return show_probe(info, out)
        if args.command == "demo":
            return run_demo(args, out)
        if args.command == "compare":
            return run_compare(args, out)
        return args.run(args)
    except KeyboardInterrupt:
        out.clear_progress()
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (| head): silence the flush at exit, as cat would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
