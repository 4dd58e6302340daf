"""``python -m demo``: serve the demo with uvicorn and print its address.

Usage: ``python -m demo [--host 127.0.0.1] [--port 8000] [--redis URL] [--workers N]
[--no-downstream]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from demo.app import (
    DOWNSTREAM_ENV,
    REDIS_ENV,
    WORK_SECONDS_ENV,
    DemoConfigError,
    DemoServer,
    create_app,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line; refuse combinations that cannot work."""
    parser = argparse.ArgumentParser(
        prog="python -m demo", description="Serve the cancelkit demo (a search box)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get(REDIS_ENV) or None,
        help=f"run on Redis, e.g. redis://127.0.0.1:6379/0 (default: ${REDIS_ENV}, else memory)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (more than 1 needs --redis)"
    )
    parser.add_argument(
        "--work-seconds", type=float, default=1.5, help="how long one search takes (1.5)"
    )
    parser.add_argument(
        "--no-downstream",
        dest="downstream",
        action="store_false",
        help="search in process instead of asking the downstream service over HTTP",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and args.redis is None:
        parser.error(
            "--workers above 1 needs --redis URL: the in-memory backend lives in one process, "
            "so a Stop or a keystroke served by one worker could not reach a search on another"
        )
    if args.work_seconds < 0:
        parser.error("--work-seconds must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted (Ctrl+C)."""
    args = parse_args(argv)
    try:
        # Built here even with several workers (each builds its own): a bad setup fails now.
        app = create_app(
            redis_url=args.redis, work_seconds=args.work_seconds, downstream=args.downstream
        )
    except DemoConfigError as exc:
        sys.exit(f"cancelkit demo: {exc}")
    if args.workers == 1:
        config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False)
    else:  # each worker process builds the application from the environment
        os.environ[REDIS_ENV] = args.redis
        os.environ[WORK_SECONDS_ENV] = str(args.work_seconds)
        os.environ[DOWNSTREAM_ENV] = "1" if args.downstream else ""
        config = uvicorn.Config(
            "demo.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            access_log=False,
            # uvicorn makes the workers' servers itself (not DemoServer): end the event
            # streams that still hold a connection this long after a shutdown began.
            timeout_graceful_shutdown=2,
        )
    sock = config.bind_socket()  # bound first, so the address printed is the real one...
    sock.listen(config.backlog)  # ...and connections to it wait for the server, not fail
    host, port = sock.getsockname()[:2]
    print(f"cancelkit demo: open http://{host}:{port}", flush=True)
    if args.workers == 1:
        DemoServer(config).run(sockets=[sock])
    else:
        Multiprocess(config, sockets=[sock]).run()


if __name__ == "__main__":
    main()
