from __future__ import annotations

import argparse
import logging
from pathlib import Path

# Seconds SIGTERM waits for requests in flight before their connections are closed.
SHUTDOWN_S = 10


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "serve",
        help="run the hosted evaluation service (web API and leaderboard page)",
        description="Serves the API (/api/..., schema at /docs) and the page (/) of a hosted leaderboard whose real "
        "data and answer key stay on this machine. Set it up with `medsynbench host init`; run workers with "
        "`medsynbench worker`.",
    )
    p.add_argument("--config", required=True, type=Path, help="service.yaml")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    w = sub.add_parser(
        "worker",
        help="evaluate queued submissions of the hosted service",
        description="Claims queued submissions, trains and scores them on the host's real data, writes the result "
        "and rebuilds the page. Run several at once; a killed worker's job is retried by another.",
    )
    w.add_argument("--config", required=True, type=Path, help="service.yaml")
    w.add_argument("--once", action="store_true", help="process at most one submission, then exit")
    w.add_argument("--drain", action="store_true", help="exit when no submission is waiting")
    w.add_argument(
        "--ray", metavar="ADDRESS", help="run --workers worker loops on a Ray cluster ('auto' or host:port)"
    )
    w.add_argument("--workers", type=int, default=1, help="worker loops to start with --ray (default 1)")
    w.set_defaults(func=cmd_worker)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bench.service.app import create_app
    from bench.service.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config)
    app = create_app(settings)
    # uvicorn's own access log prints the query string; bench.service.gate writes one without it.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=False,
        # An idle connection and a stalled shutdown end within seconds; a stalled body within
        # limits.body_timeout_s (bench.service.gate).
        timeout_keep_alive=5,
        timeout_graceful_shutdown=SHUTDOWN_S,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.service.host import Host
    from bench.service.worker import run_on_ray, run_worker

    if args.ray:
        if args.workers < 1:
            raise BadInput(f"--workers {args.workers}: must be at least 1")
        n = run_on_ray(
            args.config, args.workers, None if args.ray == "local" else args.ray, idle_exit=args.drain
        )
        print(f"processed {n} submission(s)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = Host.from_file(args.config)
    host.init()
    n = run_worker(host, once=args.once, idle_exit=args.drain)
    print(f"processed {n} submission(s)")
    return 0
