"""HTTP benchmark: wrk against nginx, ``uringsend serve`` in every mode, and aiohttp, one core each.

Every server serves the same directory of warm files from one pinned core (uringsend and aiohttp:
the process pinned with sched_setaffinity, io-wq workers included; nginx: one worker, master and
worker pinned to the same core); wrk runs on another core. For each file size every contender is
measured ``--repeat`` times, the order rotated each round, and the median run is kept. Server CPU
time (user and system) is read from /proc for each run, so the cost per request stays comparable
even when other work shares the machine; the CPU that other processes used during the runs is
reported too. Writes bench/results/http-latest.json and http-latest.md.

The aiohttp rows run ``python -m bench.aiohttp_server`` (``web.FileResponse``; on asyncio's loop
or uvloop, with or without ``uringsend.aio.install()``); they are skipped, with the reason, when
that module, aiohttp or uvloop is missing.

    python -m bench.http [--sizes 4K,1M] [--duration 3] [--repeat 7] [--connections 32]
                         [--modes auto,copy,mmap,zerocopy,splice] [--no-aiohttp] [--profile]
                         [--install-tools]
"""
import os
import sys

if __package__ in (None, ""):
    # Run as `python bench/http.py`: this file's directory would shadow the stdlib's http package.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import importlib.util
import io
import json
import pstats
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

import psutil

from bench import machine
from uringsend.aio import AsyncRing
from uringsend.ring import AUTO, MODES

KiB, MiB = 1 << 10, 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "results")
REFERENCE = "nginx"
DEFAULT_SERVE = "uringsend auto"  # what `uringsend serve` runs without --mode
GOALS = ((4 * KiB, "req_s", 0.5), (1 * MiB, "mb_s", 1.0))  # `uringsend serve` / nginx on one core
PROFILE_LINES = 25
TOOLS = {"wrk": "wrk", "nginx": "nginx-light"}  # program -> Debian package
AIOHTTP_ROWS = (("asyncio", False), ("uvloop", False), ("asyncio", True), ("uvloop", True))

NGINX_CONF = """\
worker_processes 1;
worker_cpu_affinity {mask};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    types {{ application/octet-stream bin; }}
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.http", description=(
        "wrk against nginx (sendfile on, one worker), `uringsend serve` in each mode and aiohttp, "
        "each on one pinned core: requests/s, MB/s, p50/p99, server CPU per request, ratios to "
        "nginx. Writes JSON and Markdown."))
    p.add_argument("--sizes", default="4K,1M", help="file sizes, comma separated (default 4K,1M)")
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    p.add_argument("--repeat", type=int, default=7,
                   help="runs per contender and size, in rotated order; the median is kept (default 7)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"uringsend serve modes, comma separated (default {','.join(MODES)})")
    p.add_argument("--no-aiohttp", action="store_true", help="leave out the aiohttp rows")
    p.add_argument("--server-cpu", type=int, help="core for the servers (default: the last one allowed)")
    p.add_argument("--client-cpu", type=int, help="core for wrk (default: the first other one)")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, profile `uringsend serve` (cProfile) at the smallest size; "
                   "the top functions go into the report")
    p.add_argument("--install-tools", action="store_true",
                   help="install wrk and nginx with apt-get when missing (needs root)")
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 repeat")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.repeat = 2, 1
    args.sizes = [_parse_size(s) for s in args.sizes.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    return args


def _parse_size(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, mult in (("K", KiB), ("M", MiB)):
        if text.endswith(suffix):
            return int(text[:-1]) * mult
    return int(text)


def _label(size):
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    return f"{size // KiB} KiB" if size % KiB == 0 else f"{size} B"


# ---- tools -------------------------------------------------------------------------------------
def _find(name):
    path = shutil.which(name)
    if path:
        return path
    return next((d + "/" + name for d in ("/usr/sbin", "/sbin") if os.access(d + "/" + name, os.X_OK)), None)


def ensure_tools(install):
    """{program: path} for wrk and nginx. Missing ones are installed with apt-get when asked to
    (``--install-tools``, as root); otherwise the program stops and prints the command."""
    missing = [name for name in TOOLS if _find(name) is None]
    if missing:
        packages = " ".join(TOOLS[name] for name in missing)
        command = f"apt-get install -y {packages}"
        if not install:
            raise SystemExit(f"bench.http needs {' and '.join(missing)}: install with `{command}` "
                             "(Debian), or run `python -m bench.http --install-tools` as root")
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SystemExit(f"--install-tools needs root and apt-get; install by hand: `{command}`")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print(f"installing {packages} with apt-get ...", flush=True)
        if subprocess.run(["apt-get", "install", "-y", "-qq", *packages.split()], env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", *packages.split()], env=env, check=True)
    paths = {name: _find(name) for name in TOOLS}
    for name, path in paths.items():
        if path is None:
            raise SystemExit(f"{TOOLS[name]} is installed but {name} is still not found")
    return paths


def _pin(cpu):
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


async def _aio_ring_flags():
    """The setup flags uringsend.aio (so the server) gets from this kernel."""
    async with AsyncRing(8) as aring:
        return aring.ring.setup_flags


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_words(stderr):
    """The last line a server wrote to its stderr file."""
    stderr.seek(0)
    lines = stderr.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(nothing on stderr)"


def _wait_listening(port, proc, stderr, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}: {_last_words(stderr)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # these servers have no readiness signal other than the port accepting
    raise SystemExit(f"{what} did not listen on port {port} within {timeout} s")


def _wait_ready(proc, stderr, what, timeout=30.0):
    """The port from the server's ``ready <port>`` line."""
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and not line.endswith("\n"):
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(proc.stdout.fileno(), 256).decode()
        if not chunk:  # stdout closed: the server is exiting
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            break
        line += chunk
    match = re.match(r"ready (\d+)\n", line)
    if not match:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise SystemExit(f"{what} did not say `ready <port>` within {timeout} s ({line!r}): "
                             f"{_last_words(stderr)}")
        raise SystemExit(f"{what} exited with status {proc.returncode}: {_last_words(stderr)}")
    return int(match.group(1))


# ---- servers -----------------------------------------------------------------------------------
class Server:
    def __init__(self, name, argv, port, cpu, ready_line=False, stop_signal=signal.SIGINT):
        self.name = name
        self.stop_signal = stop_signal
        # stderr goes to a file: a pipe nobody reads could fill up and stall the server
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, preexec_fn=_pin(cpu), cwd=REPO, stderr=self.stderr,
                                     stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL)
        try:
            if ready_line:
                self.port = _wait_ready(self.proc, self.stderr, name)
            else:
                self.port = port
                _wait_listening(port, self.proc, self.stderr, name)
        except SystemExit:
            self.stop()
            raise
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self):
        """(user, system) CPU of the server and its children (nginx's worker)."""
        user = system = 0.0
        for p in [self.ps] + self.ps.children(recursive=True):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            user += t.user
            system += t.system
        return user, system

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


def start_uringsend(root, cpu, mode, profile=None):
    port = _free_port()
    argv = [sys.executable]
    if profile:
        argv += ["-m", "cProfile", "-o", profile]
    argv += ["-m", "uringsend", "serve", root, "--port", str(port), "--mode", mode]
    return Server(f"uringsend {mode}", argv, port, cpu)


def start_nginx(binary, root, cpu, tmp):
    port = _free_port()
    mask = format(1 << cpu, "b") if cpu is not None else "auto"
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(mask=mask, tmp=tmp, port=port, root=root))
    return Server("nginx", [binary, "-p", tmp, "-e", os.path.join(tmp, "error.log"), "-c", conf], port, cpu,
                  stop_signal=signal.SIGQUIT)


def aiohttp_rows():
    """[(name, extra argv)] of the aiohttp contenders that can run here, and [reasons] for those
    that cannot."""
    if importlib.util.find_spec("bench.aiohttp_server") is None:
        return [], ["aiohttp rows skipped: bench/aiohttp_server.py is not in this tree"]
    if importlib.util.find_spec("aiohttp") is None:
        return [], ["aiohttp rows skipped: aiohttp is not installed (pip install aiohttp)"]
    rows, skipped = [], []
    for loop, install in AIOHTTP_ROWS:
        name = f"aiohttp {loop}" + (" + uringsend" if install else "")
        if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            skipped.append(f"{name} skipped: uvloop is not installed (pip install uvloop)")
            continue
        rows.append((name, ["--loop", loop] + (["--install"] if install else [])))
    return rows, skipped


def start_aiohttp(name, extra, root, cpu):
    argv = [sys.executable, "-m", "bench.aiohttp_server", "--root", root, "--port", "0", *extra]
    return Server(name, argv, None, cpu, ready_line=True, stop_signal=signal.SIGTERM)


# ---- wrk ---------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def run_wrk(wrk, url, duration, connections, cpu):
    proc = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
                          preexec_fn=_pin(cpu), capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    out = proc.stdout
    latency = {int(p): float(v) * _UNITS[u]
               for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(done.group(1)), "seconds": float(done.group(2)) * _UNITS[done.group(3)] / 1e3,
            "p50_ms": latency.get(50), "p99_ms": latency.get(99),
            "socket_errors": errors, "non_2xx": int(bad.group(1)) if bad else 0}


def _busy_seconds():
    """CPU seconds the whole machine spent busy so far (every core)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def measure(server, wrk, size, args, cpu):
    before = server.cpu_seconds()
    busy = _busy_seconds()
    children = os.times()
    r = run_wrk(wrk, f"http://127.0.0.1:{server.port}/{size}.bin", args.duration, args.connections, cpu)
    children = os.times().children_user + os.times().children_system - children.children_user - children.children_system
    busy = _busy_seconds() - busy
    user, system = (a - b for a, b in zip(server.cpu_seconds(), before))
    r["req_s"] = r["requests"] / r["seconds"]
    r["mb_s"] = r["req_s"] * size / 1e6
    r["server_cpu_s"] = round(user + system, 3)
    n = r["requests"] or 1
    r["server_user_us_per_req"] = user / n * 1e6
    r["server_sys_us_per_req"] = system / n * 1e6
    r["server_cpu_us_per_req"] = (user + system) / n * 1e6
    # what neither the server nor wrk used: other processes sharing the machine
    r["other_cores"] = max(0.0, (busy - user - system - children) / r["seconds"])
    return r


# ---- profile -----------------------------------------------------------------------------------
def profile_uringsend(root, args, wrk, cpus):
    """`uringsend serve` under cProfile at the smallest size: the run and the top functions."""
    size = min(args.sizes)
    tmp = tempfile.mkdtemp(prefix="uringsend-prof-")
    prof = os.path.join(tmp, "serve.prof")
    server = start_uringsend(root, cpus[0], "auto", profile=prof)
    try:
        r = measure(server, wrk, size, args, cpus[1])
    finally:
        server.stop()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(PROFILE_LINES)
    shutil.rmtree(tmp)
    table = text.getvalue()
    table = table[table.index("   ncalls"):]  # drop pstats' preamble (temp file name, date)
    return {"size": size, "req_s": r["req_s"],
            "top_by_tottime": re.sub(r"/\S*/(uringsend|asyncio|bench)/", r"\1/", table)}


# ---- report ------------------------------------------------------------------------------------
def summarize(runs):
    """The median run (by requests/s), with the spread of all runs and the median CPU costs."""
    ordered = sorted(runs, key=lambda r: r["req_s"])
    median = dict(ordered[len(ordered) // 2])
    rates = [r["req_s"] for r in runs]
    median["spread"] = (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else None
    for key in ("server_user_us_per_req", "server_sys_us_per_req", "server_cpu_us_per_req"):
        median[key] = statistics.median(r[key] for r in runs)
    return median


def ratios(results):
    """Each contender against nginx, per round (the runs of one round are seconds apart, so a
    burst of other load hits both sides alike), the median over the rounds: requests/s (so
    MB/s), requests per busy core (nginx's CPU per request over the contender's), p99."""
    out = {}
    for size, by_server in results.items():
        ref_runs = by_server[REFERENCE]["runs"]
        out[size] = {}
        for name, entry in by_server.items():
            pairs = list(zip(entry["runs"], ref_runs))
            rate = _median_ratio(pairs, "req_s")
            out[size][name] = {
                "req_s": rate, "mb_s": rate,
                "per_core": _median_ratio([(n, r) for r, n in pairs], "server_cpu_us_per_req"),
                "p99": _median_ratio(pairs, "p99_ms"),
                "req_s_of_medians": entry["median"]["req_s"] / by_server[REFERENCE]["median"]["req_s"]}
    return out


def _median_ratio(pairs, key):
    """Median of a[key] / b[key] over the pairs where both are known and b's is not zero."""
    values = [a[key] / b[key] for a, b in pairs if a[key] is not None and b[key]]
    return statistics.median(values) if values else None


def best_modes(results, ratios):
    """Per size: the uringsend mode with the highest requests/s against nginx, and its spread."""
    out = {}
    for size, by_server in results.items():
        modes = [name for name in by_server if name.startswith("uringsend ")]
        if modes:
            name = max(modes, key=lambda n: ratios[size][n]["req_s"])
            median = by_server[name]["median"]
            out[size] = {"server": name, "req_s": median["req_s"], "ratio": ratios[size][name]["req_s"],
                         "spread": median["spread"]}
    return out


def _times(x):
    return "—" if x is None else f"{x:.2f}x"


def _pct(x):
    return "—" if x is None else f"{x * 100:.0f}%"


def markdown(doc):
    m = doc["machine"]
    params = doc["params"]
    other = doc["other_load"]
    lines = [f"## HTTP benchmark: nginx, `uringsend serve`, aiohttp — {m['host']}, {doc['started']}", "",
             f"{m['cpu_model']}, {m['cores_logical']} cores, Linux {m['kernel']}, Python {m['python']}, "
             f"uringsend {m['uringsend']} at {m['uringsend_commit']} (server ring flags "
             f"{'|'.join(doc['server_ring_flags'])}), {doc['nginx_version']}, {doc['wrk_version']}. "
             f"Servers pinned to core {params['server_cpu']} (nginx: 1 worker, sendfile on), wrk on core "
             f"{params['client_cpu']}, {params['connections']} keep-alive connections, "
             f"{params['duration']} s per run, median of {params['repeat']} runs per contender in rotated "
             f"order. MB/s counts file bytes (10^6). Command: `{doc['command']}`", "",
             f"Load: load average {m['loadavg_start']} at the start, {doc['loadavg_end']} at the end. During "
             f"the runs, processes other than the server and wrk kept {other['mean_cores']:.2f} of the "
             f"{m['cores_logical']} cores busy on average (most {other['max_cores']:.2f} in one run): "
             + ("the machine was shared, so absolute rates vary between runs; compare ratios and CPU "
                "per request." if other["mean_cores"] > 0.1 else "the machine was otherwise quiet."), ""]
    for note in doc["skipped"]:
        lines.append(f"- {note}")
    if doc["skipped"]:
        lines.append("")
    lines += ["| file | server | requests/s | vs nginx | spread | MB/s | p50 ms | p99 ms | "
              "server CPU µs/request (user + sys) | requests/s per busy core | vs nginx | errors |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, by_server in doc["results"].items():
        for name, entry in by_server.items():
            r = entry["median"]
            ratio = doc["ratios"][size][name]
            lines.append(
                f"| {_label(int(size))} | {name} | {r['req_s']:,.0f} | {_times(ratio['req_s'])} | {_pct(r['spread'])} | "
                f"{r['mb_s']:,.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_us_per_req']:.1f} "
                f"({r['server_user_us_per_req']:.1f} + {r['server_sys_us_per_req']:.1f}) | "
                f"{1e6 / r['server_cpu_us_per_req']:,.0f} | {_times(ratio['per_core'])} | "
                f"{r['socket_errors'] + r['non_2xx']} |")
    lines += ["", "Ratios to nginx are medians over the rounds of each round's ratio (the runs of a round "
              "are seconds apart). Spread: (fastest − slowest run) / median run, of requests/s. p50 and p99: "
              "of the median run. Server CPU per request: the median over the runs. Requests/s per busy "
              "core: 10^6 / (server CPU µs per request), what the server's core would serve if "
              "the server were its only work and wrk kept up; it depends far less on other load than "
              "requests/s does. All runs, requests/s, in round order:", ""]
    for size, by_server in doc["results"].items():
        for name, entry in by_server.items():
            lines.append(f"- {_label(int(size))} {name}: " + ", ".join(f"{x['req_s']:,.0f}" for x in entry["runs"]))
    lines.append("")
    if DEFAULT_SERVE in doc["ratios"].get(str(doc["params"]["sizes"][0]), {}):
        lines.append(f"- `auto` sends as `{AUTO}` (uringsend.ring.AUTO): where both rows are present, the "
                     "gap between them is run-to-run noise.")
    for size, best in doc["best_modes"].items():
        lines.append(f"- Best `uringsend serve` mode at {_label(int(size))}: {best['server'].split()[1]} "
                     f"({best['ratio']:.2f}x nginx's requests/s; {best['req_s']:,.0f} requests/s, spread "
                     f"{_pct(best['spread'])}).")
    for goal in doc["goals"]:
        per_core = doc["ratios"][str(goal["size"])][goal["server"]]["per_core"]
        lines.append(f"- Goal: {goal['server']} {'requests/s' if goal['metric'] == 'req_s' else 'MB/s'} at "
                     f"{_label(goal['size'])} >= {goal['target']}x nginx: {goal['ratio']:.2f}x — "
                     f"{'met' if goal['met'] else 'missed'} (per busy core: {_times(per_core)})")
    if doc.get("profile"):
        p = doc["profile"]
        lines += ["", f"### Where `uringsend serve`'s time goes at {_label(p['size'])}", "",
                  f"cProfile, mode auto, top {PROFILE_LINES} functions by own time ({p['req_s']:,.0f} requests/s "
                  "while profiled; the profiler slows Python down several times):", "", "```",
                  p["top_by_tottime"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    tools = ensure_tools(args.install_tools)
    wrk, nginx = tools["wrk"], tools["nginx"]
    allowed = sorted(os.sched_getaffinity(0))
    server_cpu = args.server_cpu if args.server_cpu is not None else (allowed[-1] if len(allowed) > 1 else None)
    client_cpu = args.client_cpu if args.client_cpu is not None else (
        next((c for c in allowed if c != server_cpu), None) if server_cpu is not None else None)
    os.makedirs(args.out, exist_ok=True)
    rows, skipped = ([], ["aiohttp rows left out (--no-aiohttp)"]) if args.no_aiohttp else aiohttp_rows()
    for note in skipped:
        print(note, flush=True)
    doc = {"command": "python -m bench.http " + " ".join(sys.argv[1:] if argv is None else argv),
           "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine.describe(),
           "nginx_version": subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip(),
           "wrk_version": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip(),
           "server_ring_flags": asyncio.run(_aio_ring_flags()), "skipped": skipped,
           "params": {"sizes": args.sizes, "duration": args.duration, "repeat": args.repeat,
                      "connections": args.connections, "modes": args.modes, "server_cpu": server_cpu,
                      "client_cpu": client_cpu}}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        root = os.path.join(tmp, "www")
        os.mkdir(root)
        for size in args.sizes:
            with open(os.path.join(root, f"{size}.bin"), "wb") as f:
                f.write(os.urandom(size))
        for path in (tmp, root) + tuple(os.path.join(root, n) for n in os.listdir(root)):
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)  # nginx's worker is not root
        servers = {}
        results = {}
        try:
            servers[REFERENCE] = start_nginx(nginx, root, server_cpu, tmp)
            for mode in args.modes:
                server = start_uringsend(root, server_cpu, mode)
                servers[server.name] = server
            for name, extra in rows:
                try:
                    servers[name] = start_aiohttp(name, extra, root, server_cpu)
                except SystemExit as exc:  # this row only: the others still run
                    skipped.append(f"{name} skipped: it did not start ({str(exc)[-300:]})")
                    print(skipped[-1], flush=True)
            names = list(servers)
            for size in args.sizes:
                runs = {name: [] for name in names}
                for name in names:  # warm up: page cache, server caches, TCP
                    run_wrk(wrk, f"http://127.0.0.1:{servers[name].port}/{size}.bin", 1, args.connections, client_cpu)
                for i in range(args.repeat):
                    shift = i % len(names)
                    for name in names[shift:] + names[:shift]:
                        r = measure(servers[name], wrk, size, args, client_cpu)
                        runs[name].append(r)
                        print(f"{_label(size):>7} {name:28} {r['req_s']:10,.0f} req/s {r['mb_s']:9,.1f} MB/s "
                              f"p99 {r['p99_ms']:7.2f} ms  cpu {r['server_cpu_us_per_req']:6.1f} us/req  "
                              f"others {r['other_cores']:.2f} cores", flush=True)
                results[str(size)] = {name: {"runs": rs, "median": summarize(rs)} for name, rs in runs.items()}
        finally:
            for server in servers.values():
                server.stop()
        doc["results"] = results
        doc["ratios"] = ratios(results)
        doc["best_modes"] = best_modes(results, doc["ratios"])
        others = [r["other_cores"] for by_server in results.values() for e in by_server.values() for r in e["runs"]]
        doc["other_load"] = {"mean_cores": statistics.mean(others), "max_cores": max(others)}
        doc["goals"] = []
        for size, metric, target in GOALS:
            for server in (DEFAULT_SERVE, doc["best_modes"].get(str(size), {}).get("server")):
                if str(size) in doc["ratios"] and server in doc["ratios"][str(size)]:
                    ratio = doc["ratios"][str(size)][server][metric]
                    doc["goals"].append({"size": size, "metric": metric, "target": target, "server": server,
                                         "ratio": ratio, "met": ratio >= target})
                    if server == DEFAULT_SERVE and doc["best_modes"][str(size)]["server"] == DEFAULT_SERVE:
                        break
        if args.profile:
            doc["profile"] = profile_uringsend(root, args, wrk, (server_cpu, client_cpu))
    doc["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    with open(os.path.join(args.out, "http-latest.json"), "w") as f:
        json.dump(doc, f, indent=1)
    text = markdown(doc)
    with open(os.path.join(args.out, "http-latest.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
