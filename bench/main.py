"""``python -m bench``: every contender, every section, one run; JSON, Markdown and plots out."""
import argparse
import dataclasses
import os
import sys
import time

import psutil

from uringsend import measure

from . import machine, report, sections
from .client import Worker

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Plan:
    """How much of everything to measure. ``counts`` maps a size bound to the request count for
    sizes up to it (latency); requests are split over ``rounds`` interleaved rounds. The cost per
    transfer runs in as many rounds, for about ``cost_transfer_seconds`` in all."""

    preset: str
    sizes: list
    counts: dict
    rounds: int
    stream_size: int
    stream_reps: int
    cost_reps: int
    cost_transfer_seconds: float
    clients: list
    concurrency_size: int
    concurrency_warmup: float
    concurrency_duration: float
    memory_size: int = 1 << 30
    memory_reps: int = 5
    requests_override: int = None

    def requests(self, size):
        if self.requests_override:
            n = self.requests_override
        else:
            n = next(c for bound, c in sorted(self.counts.items()) if size <= bound)
        return max(self.rounds, n - n % self.rounds)


SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB]
ANY = 1 << 62
PRESETS = {
    # 2000+ samples beyond warm-up for the small sizes: p99 rests on 50 samples, p99.9 on 5
    "full": dict(counts={64 * KiB: 5000, 1 * MiB: 1000, ANY: 200}, rounds=5, stream_size=256 * MiB,
                 stream_reps=9, cost_reps=4, cost_transfer_seconds=30.0, clients=[1, 16, 64],
                 concurrency_size=64 * KiB, concurrency_warmup=0.5, concurrency_duration=3.0,
                 memory_size=1 << 30, memory_reps=5),
    "quick": dict(counts={64 * KiB: 600, 1 * MiB: 150, ANY: 24}, rounds=2, stream_size=256 * MiB,
                  stream_reps=2, cost_reps=2, cost_transfer_seconds=6.0, clients=[1, 16, 64],
                  concurrency_size=64 * KiB, concurrency_warmup=0.2, concurrency_duration=0.6,
                  memory_size=256 * MiB, memory_reps=3),
    "tiny": dict(counts={64 * KiB: 60, 1 * MiB: 20, ANY: 4}, rounds=1, stream_size=32 * MiB,
                 stream_reps=1, cost_reps=1, cost_transfer_seconds=1.0, clients=[1, 16, 64],
                 concurrency_size=64 * KiB, concurrency_warmup=0.05, concurrency_duration=0.15,
                 memory_size=16 * MiB, memory_reps=1),
}


def parse_size(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, mult in (("K", KiB), ("M", MiB), ("G", 1 << 30)):
        if text.endswith(suffix):
            return int(text[:-1]) * mult
    return int(text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=(
        "uringsend vs blocking splice/sendfile/read+send over loopback: latency, release, "
        "throughput, cost per transfer, cost, concurrency. Writes JSON, Markdown and plots."))
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="every contender and section at reduced counts (< 60 s)")
    speed.add_argument("--tiny", action="store_true", help="minimal counts, for the smoke test (~15 s); "
                       "numbers are not meaningful")
    p.add_argument("--sizes", help="latency response sizes, comma separated (e.g. 4K,64K,1M,16M)")
    p.add_argument("--requests", type=int, help="latency requests per contender and size (all sizes)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--json-only", action="store_true", help="write only the JSON (no table, Markdown or plots)")
    args = p.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be >= 1")
    return args


def make_plan(args):
    preset = "quick" if args.quick else "tiny" if args.tiny else "full"
    sizes = sorted({parse_size(s) for s in args.sizes.split(",")}) if args.sizes else list(SIZES)
    return Plan(preset=preset, sizes=sizes, requests_override=args.requests, **PRESETS[preset])


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = make_plan(args)
    began = time.monotonic()

    def log(msg):
        if not args.json_only:
            print(f"[{time.monotonic() - began:6.1f}s] {msg}", file=sys.stderr, flush=True)

    proc = psutil.Process()
    fds_start = proc.num_fds()
    # Clients first: forked before any file, socket or ring exists, so they inherit none.
    workers = [Worker() for _ in range(max(1, min(2, os.cpu_count() or 1)))]
    files = server = None
    contenders = {}
    try:
        result = {
            "schema": 1,
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "stamp": time.strftime("%Y%m%d-%H%M"),
            "command": " ".join(["python -m bench"] + (sys.argv[1:] if argv is None else list(argv))),
            "machine": machine.describe(),
            "config": dataclasses.asdict(plan),
            "contenders": list(measure.CONTENDERS),
        }
        result["config"]["counts"] = {str(s): plan.requests(s) for s in plan.sizes}
        result["config"]["cost_transfer_sizes"] = list(sections.COST_SIZES)
        files = measure.Workspace(plan.sizes + list(sections.COST_SIZES) + [plan.stream_size, plan.concurrency_size])
        log(f"files ready in {files.dir}; preset {plan.preset}")
        server = measure.Server()
        conns = {}
        for name in measure.CONTENDERS:
            contenders[name] = measure.make(name)
            conns[name] = server.connect(workers[0], name, 1)[0]
        result["latency"], result["release"] = sections.latency(plan, contenders, conns, workers[0], files, log)
        result["throughput"] = sections.throughput(plan, contenders, conns, workers[0], files, log)
        for sender in contenders.values():
            sender.close()
        contenders.clear()
        result["cost_per_transfer"] = sections.cost_per_transfer(plan, server, workers[0], files, log)
        result["cost"] = sections.cost(plan, measure.CONTENDERS, conns, workers[0], files, log)
        for name in measure.CONTENDERS:
            workers[0].call("close", name)
            conns[name].close()
        result["concurrency"] = sections.concurrency(plan, measure.URING_MODES, server, workers, files, log)
        result["memory_stream"] = sections.memory_stream(plan, server, workers[0], log)
    finally:
        for sender in contenders.values():
            sender.close()
        if server is not None:
            server.close()
        if files is not None:
            files.close()
        for worker in workers:
            worker.close()
    result["fds"] = {"start": fds_start, "end": proc.num_fds()}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    report.add_ratios(result)
    result["fastest"] = report.fastest(result)
    result["targets"] = report.targets(result)
    written = report.write(result, args.out, args.json_only)
    if args.json_only:
        print(written[0])
    else:
        print(report.markdown(result))
        print("wrote " + ", ".join(written), file=sys.stderr)
    return 0
