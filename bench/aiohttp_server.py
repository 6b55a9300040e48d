"""An aiohttp static-file server for the HTTP benchmark: every file under --root served with
``web.FileResponse`` (which calls ``loop.sendfile()``), on asyncio's loop or uvloop, with or without
``uringsend.aio.install()``. One process; prints ``ready <port>`` once listening; exits cleanly on
SIGTERM or SIGINT.

    python -m bench.aiohttp_server --root DIR --port N [--loop asyncio|uvloop] [--install] [--mode MODE]
"""
import argparse
import asyncio
import os
import pathlib
import signal
import sys

from aiohttp import web

from uringsend.ring import MODES


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.aiohttp_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, type=pathlib.Path, help="directory whose files are served")
    p.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--install", action="store_true", help="uringsend.aio.install() before serving")
    p.add_argument("--mode", choices=MODES, default="auto", help="install()'s mode (with --install)")
    args = p.parse_args(argv)
    if args.mode != "auto" and not args.install:
        p.error("--mode applies to --install")
    if not args.root.is_dir():
        p.error(f"--root {args.root} is not a directory")
    if os.environ.get("AIOHTTP_NOSENDFILE"):
        p.error("AIOHTTP_NOSENDFILE is set: aiohttp would never call loop.sendfile()")
    return args


def make_app(root):
    root = str(root.resolve())

    async def serve(request):
        parts = request.match_info["path"].split("/")
        if any(not part or part.startswith(".") for part in parts):
            raise web.HTTPNotFound()  # no empty, hidden, "." or ".." segments: nothing above root
        return web.FileResponse(os.path.join(root, *parts))  # FileResponse answers 404 itself

    app = web.Application()
    app.router.add_get("/{path:.*}", serve)  # answers HEAD as well
    return app


async def main(args):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(args.root), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port, backlog=1024)
        await site.start()
        port = runner.addresses[0][1]
        print(f"ready {port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.install:
        import uringsend.aio
        uringsend.aio.install(mode=args.mode)
    if args.loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    loop = factory()
    try:
        loop.run_until_complete(main(args))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    if args.install:
        import uringsend.aio
        stats = uringsend.aio.install_statistics()
        print(f"uringsend: {stats.transfers} transfers, {stats.bytes_sent} bytes through io_uring, "
              f"{stats.errors} errors, fallbacks {dict(stats.fallbacks)}", file=sys.stderr)


if __name__ == "__main__":
    run()
