"""HTTP benchmark: wrk against ``uringsend serve`` and against nginx (sendfile on), one core each.

Both servers serve the same directory of warm files from one pinned core (uringsend: the process
pinned with sched_setaffinity, io-wq workers included; nginx: one worker, master and worker pinned
to the same core); wrk runs on another core. For each file size the two servers are measured in
alternating order ``--repeat`` times and the median run is kept. Server CPU time is read from
/proc for each run, so the cost per request stays comparable even when other work shares the
machine. Writes bench/results/http-latest.json and http-latest.md.

    python -m bench.http [--duration 8] [--repeat 5] [--connections 32] [--profile]
"""
import os
import sys

if __package__ in (None, ""):
    # Run as `python bench/http.py`: this file's directory would shadow the stdlib's http package.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import io
import json
import pstats
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psutil

from bench import machine
from uringsend.aio import AsyncRing

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SERVERS = ("uringsend", "nginx")
GOALS = ((4 * KiB, "req_s", 0.5), (1 * MiB, "mb_s", 0.9))  # uringsend/nginx on one core
PROFILE_LINES = 25

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
        "wrk against `uringsend serve` and nginx (sendfile on, one worker), each on one pinned "
        "core: requests/s, MB/s, p99, server CPU per request. Writes JSON and Markdown."))
    p.add_argument("--sizes", default="4K,64K,1M", help="file sizes, comma separated (default 4K,64K,1M)")
    p.add_argument("--duration", type=int, default=8, help="seconds per wrk run (default 8)")
    p.add_argument("--repeat", type=int, default=5, help="runs per server and size; the median is kept (default 5)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--mode", default="auto", help="uringsend mode (default auto)")
    p.add_argument("--server-cpu", type=int, help="core for the servers (default: the last one allowed)")
    p.add_argument("--client-cpu", type=int, help="core for wrk (default: the first other one)")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, profile the uringsend server (cProfile) at the smallest size; "
                   "the top functions go into the report")
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 repeat")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.repeat = 3, 1
    args.sizes = [_parse_size(s) for s in args.sizes.split(",")]
    return args


def _parse_size(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, mult in (("K", KiB), ("M", MiB)):
        if text.endswith(suffix):
            return int(text[:-1]) * mult
    return int(text)


def _label(size):
    return f"{size // MiB} MiB" if size >= MiB and size % MiB == 0 else f"{size // KiB} KiB" if size % KiB == 0 else f"{size} B"


# ---- tools -------------------------------------------------------------------------------------
def ensure_tool(names, package):
    """Path of the first of ``names`` found; installs the Debian ``package`` when running as root."""
    def find():
        for name in names:
            path = shutil.which(name) or next((d + "/" + name for d in ("/usr/sbin", "/sbin")
                                                if os.access(d + "/" + name, os.X_OK)), None)
            if path:
                return path
        return None

    path = find()
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"bench.http needs {names[0]}: install the Debian package '{package}' "
                         f"(apt-get install {package}) or run this program as root to let it do so")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {package} with apt-get ...", flush=True)
    if subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=True)
    path = find()
    if not path:
        raise SystemExit(f"apt-get installed {package} but {names[0]} is still not found")
    return path


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


def _wait_listening(port, proc, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # startup has no readiness signal other than the port accepting
    raise SystemExit(f"{what} did not listen on port {port} within {timeout} s")


# ---- servers -----------------------------------------------------------------------------------
class Server:
    def __init__(self, name, argv, port, cpu, cwd=None):
        self.name = name
        self.port = port
        self.proc = subprocess.Popen(argv, preexec_fn=_pin(cpu), cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        _wait_listening(port, self.proc, name)
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self):
        """User + system CPU of the server and its children (nginx's worker)."""
        total = 0.0
        for p in [self.ps] + self.ps.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def start_uringsend(root, cpu, mode, profile=None):
    port = _free_port()
    argv = [sys.executable]
    if profile:
        argv += ["-m", "cProfile", "-o", profile]
    argv += ["-m", "uringsend", "serve", root, "--port", str(port), "--mode", mode]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return Server("uringsend", argv, port, cpu, cwd=repo)


def start_nginx(binary, root, cpu, tmp):
    port = _free_port()
    mask = format(1 << cpu, "b") if cpu is not None else "auto"
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(mask=mask, tmp=tmp, port=port, root=root))
    return Server("nginx", [binary, "-p", tmp, "-e", os.path.join(tmp, "error.log"), "-c", conf], port, cpu)


# ---- wrk ---------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def run_wrk(wrk, url, duration, connections, cpu):
    proc = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
                          preexec_fn=_pin(cpu), capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    out = proc.stdout
    latency = {int(p): float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(done.group(1)), "seconds": float(done.group(2)) * _UNITS[done.group(3)] / 1e3,
            "p50_ms": latency.get(50), "p99_ms": latency.get(99),
            "socket_errors": errors, "non_2xx": int(bad.group(1)) if bad else 0}


def measure(server, wrk, size, args, cpu):
    before = server.cpu_seconds()
    r = run_wrk(wrk, f"http://127.0.0.1:{server.port}/{size}.bin", args.duration, args.connections, cpu)
    cpu_s = server.cpu_seconds() - before
    r["req_s"] = r["requests"] / r["seconds"]
    r["mb_s"] = r["req_s"] * size / 1e6
    r["server_cpu_s"] = round(cpu_s, 3)
    r["server_cpu_us_per_req"] = cpu_s / r["requests"] * 1e6 if r["requests"] else None
    return r


# ---- profile -----------------------------------------------------------------------------------
def profile_uringsend(root, args, wrk, cpus):
    """The uringsend server under cProfile at the smallest size: the run and the top functions."""
    size = min(args.sizes)
    tmp = tempfile.mkdtemp(prefix="uringsend-prof-")
    prof = os.path.join(tmp, "serve.prof")
    server = start_uringsend(root, cpus[0], args.mode, profile=prof)
    try:
        r = measure(server, wrk, size, args, cpus[1])
    finally:
        server.stop()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(PROFILE_LINES)
    shutil.rmtree(tmp)
    table = text.getvalue()
    table = table[table.index("   ncalls"):]  # drop pstats' preamble (temp file name, date)
    return {"size": size, "req_s": r["req_s"], "top_by_tottime": re.sub(r"/\S*/(uringsend|asyncio)/", r"\1/", table)}


# ---- report ------------------------------------------------------------------------------------
def ratios(results):
    out = {}
    for size, by_server in results.items():
        u, n = by_server["uringsend"]["median"], by_server["nginx"]["median"]
        out[size] = {"req_s": u["req_s"] / n["req_s"], "mb_s": u["mb_s"] / n["mb_s"],
                     "p99": u["p99_ms"] / n["p99_ms"] if n["p99_ms"] else None,
                     "cpu_per_req": (u["server_cpu_us_per_req"] / n["server_cpu_us_per_req"]
                                     if n["server_cpu_us_per_req"] else None)}
    return out


def markdown(doc):
    m = doc["machine"]
    lines = [f"## HTTP benchmark: uringsend serve vs nginx — {m['host']}, {doc['started']}", "",
             f"{m['cpu_model']}, {m['cores_logical']} cores, Linux {m['kernel']}, Python {m['python']}, "
             f"uringsend {m['uringsend']} at {m['uringsend_commit']} (mode {doc['params']['mode']}, server ring "
             f"flags {'|'.join(doc['server_ring_flags'])}), {doc['nginx_version']}, {doc['wrk_version']}. "
             f"Servers pinned to core {doc['params']['server_cpu']} (nginx: 1 worker, sendfile on), wrk on core "
             f"{doc['params']['client_cpu']}, {doc['params']['connections']} keep-alive connections, "
             f"{doc['params']['duration']} s per run, median of {doc['params']['repeat']} alternating runs. "
             f"Load average {m['loadavg_start']} at start, {doc['loadavg_end']} at end (other work shares "
             "this machine). MB/s counts file bytes (10^6). Command: `" + doc["command"] + "`", "",
             "| file | server | requests/s | (all runs) | MB/s | p50 ms | p99 ms | server CPU µs/request | errors |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for size, by_server in doc["results"].items():
        for name in SERVERS:
            r = by_server[name]["median"]
            runs = ", ".join(f"{x['req_s']:,.0f}" for x in by_server[name]["runs"])
            lines.append(f"| {_label(int(size))} | {name} | {r['req_s']:,.0f} | {runs} | {r['mb_s']:,.1f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['server_cpu_us_per_req']:.1f} | {r['socket_errors'] + r['non_2xx']} |")
    lines += ["", "| file | requests/s uringsend/nginx | MB/s uringsend/nginx | p99 uringsend/nginx | CPU per request uringsend/nginx |",
              "|---|---:|---:|---:|---:|"]
    for size, r in doc["ratios"].items():
        lines.append(f"| {_label(int(size))} | {r['req_s']:.2f}x | {r['mb_s']:.2f}x | {r['p99']:.2f}x | {r['cpu_per_req']:.2f}x |")
    lines.append("")
    for goal in doc["goals"]:
        lines.append(f"- Goal {goal['metric']} at {_label(goal['size'])} >= {goal['target']}x nginx: "
                     f"{goal['ratio']:.2f}x — {'met' if goal['met'] else 'missed'}")
    if doc.get("profile"):
        p = doc["profile"]
        lines += ["", f"### Where the uringsend server's time goes at {_label(p['size'])}", "",
                  f"cProfile, top {PROFILE_LINES} functions by own time ({p['req_s']:,.0f} req/s while "
                  "profiled; the profiler roughly halves the rate):", "", "```", p["top_by_tottime"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    wrk = ensure_tool(["wrk"], "wrk")
    nginx = ensure_tool(["nginx"], "nginx")
    allowed = sorted(os.sched_getaffinity(0))
    server_cpu = args.server_cpu if args.server_cpu is not None else (allowed[-1] if len(allowed) > 1 else None)
    client_cpu = args.client_cpu if args.client_cpu is not None else (
        next((c for c in allowed if c != server_cpu), None) if server_cpu is not None else None)
    os.makedirs(args.out, exist_ok=True)
    doc = {"command": "python -m bench.http " + " ".join(sys.argv[1:] if argv is None else argv),
           "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine.describe(),
           "nginx_version": subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip(),
           "wrk_version": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip(),
           "server_ring_flags": asyncio.run(_aio_ring_flags()),
           "params": {"sizes": args.sizes, "duration": args.duration, "repeat": args.repeat,
                      "connections": args.connections, "mode": args.mode, "server_cpu": server_cpu,
                      "client_cpu": client_cpu}}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        root = os.path.join(tmp, "www")
        os.mkdir(root)
        for size in args.sizes:
            with open(os.path.join(root, f"{size}.bin"), "wb") as f:
                f.write(os.urandom(size))
        for path in (tmp, root) + tuple(os.path.join(root, n) for n in os.listdir(root)):
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)  # nginx's worker is not root
        servers = {"uringsend": start_uringsend(root, server_cpu, args.mode),
                   "nginx": start_nginx(nginx, root, server_cpu, tmp)}
        results = {}
        try:
            for size in args.sizes:
                runs = {name: [] for name in SERVERS}
                for name in SERVERS:  # warm up: page cache, server caches, TCP
                    run_wrk(wrk, f"http://127.0.0.1:{servers[name].port}/{size}.bin", 1, args.connections, client_cpu)
                for i in range(args.repeat):
                    for name in (SERVERS if i % 2 == 0 else SERVERS[::-1]):
                        r = measure(servers[name], wrk, size, args, client_cpu)
                        runs[name].append(r)
                        print(f"{_label(size):>7} {name:9} {r['req_s']:10,.0f} req/s {r['mb_s']:9,.1f} MB/s "
                              f"p99 {r['p99_ms']:7.2f} ms  cpu {r['server_cpu_us_per_req']:6.1f} us/req", flush=True)
                results[str(size)] = {name: {"runs": rs, "median": sorted(rs, key=lambda r: r["req_s"])[len(rs) // 2]}
                                      for name, rs in runs.items()}
        finally:
            servers["uringsend"].stop()
            servers["nginx"].stop(signal.SIGQUIT)
        doc["results"] = results
        doc["ratios"] = {size: r for size, r in ratios(results).items()}
        doc["goals"] = []
        for size, metric, target in GOALS:
            if str(size) in doc["ratios"]:
                ratio = doc["ratios"][str(size)][metric]
                doc["goals"].append({"size": size, "metric": metric, "target": target, "ratio": ratio,
                                     "met": ratio >= target})
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
