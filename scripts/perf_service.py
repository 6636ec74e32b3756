"""Load test of the hosted service: 200 prediction submissions from 10 client threads against a loopback server.

Prints upload throughput and latency (p50, p95), and how long two workers take to score the queue. Bounded: it
builds the tiny task's service in a scratch folder, runs on 127.0.0.1 and removes everything afterwards.

    python scripts/perf_service.py [--submissions 200] [--clients 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--submissions", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import httpx
    from service_support import Server, add_team, make_service, predictions_csv, worker_process

    tmp = Path(tempfile.mkdtemp(prefix="medsynbench-perf-"))
    try:
        config = make_service(tmp, limits={"quota_submissions": args.submissions + 1})
        tokens = [add_team(config, f"team{i}") for i in range(args.clients)]
        files = [predictions_csv(config, seed=i) for i in range(args.clients)]
        latencies: list[float] = []
        with Server(config) as srv:

            def one(i: int) -> int:
                k = i % args.clients
                t0 = time.perf_counter()
                r = httpx.post(
                    f"{srv.url}/api/submissions",
                    headers={"Authorization": f"Bearer {tokens[k]}"},
                    data={"kind": "predictions"},
                    files={"file": ("p.csv", files[k])},
                    timeout=120,
                )
                latencies.append(time.perf_counter() - t0)
                return r.status_code

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as ex:
                codes = list(ex.map(one, range(args.submissions)))
            wall = time.perf_counter() - t0
            bad = [c for c in codes if c != 202]
            q = statistics.quantiles(latencies, n=100)
            print(
                f"uploads: {args.submissions} from {args.clients} clients in {wall:.1f} s = "
                f"{args.submissions / wall:.1f} submissions/s; latency p50 {q[49] * 1000:.0f} ms, "
                f"p95 {q[94] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; non-202: {len(bad)}"
            )
            t1 = time.perf_counter()
            ws = [worker_process(config, "--drain") for _ in range(args.workers)]
            for w in ws:
                w.communicate(timeout=1800)
            sw = time.perf_counter() - t1
            from bench.service import db
            from bench.service.host import Host

            host = Host.from_file(config)
            with host.sessions() as s:
                scored = s.query(db.Submission).filter_by(status=db.SCORED).count()
                scores = s.query(db.Score).count()
            host.dispose()
            print(
                f"scoring: {scored}/{args.submissions} scored by {args.workers} workers in {sw:.1f} s "
                f"({scored / sw:.1f}/s, process start included); {scores} score rows (2 per submission)"
            )
        return 0 if not bad and scored == args.submissions and scores == 2 * scored else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
