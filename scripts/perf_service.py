"""Load test of the hosted service against a loopback server, quiet and while another client sends bombs.

1. Uploads: `--submissions` prediction files from `--clients` threads; throughput, latency (p50, p95) and the API
   process's peak memory (VmHWM). 2. The same uploads again while one more client sends, in a bounded loop, the
   hostile uploads the service must refuse cheaply: a tar.gz inflating to 1 GiB (the unpack limit, so inflated to
   the end), a tar.gz of 150,000 empty members, a zip declaring 60,000 members, a Parquet file of 10 million rows,
   and a 2 GiB upload without a token. Printed: both throughputs and their ratio (the reference is the quiet run
   of the same session), every bomb's status code and time, the API's peak memory after each phase. 3. Optionally
   (`--workers N`), how long N workers take to score the queue.

Bounded: it builds the tiny task's service in a scratch folder, talks to 127.0.0.1 only and removes everything
afterwards.

    python scripts/perf_service.py [--submissions 100] [--clients 4] [--bomb-rounds 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

UPLOAD_CAP = 8 * 1024 * 1024


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unauthenticated_flood(port: int, declared: int = 2 << 30, chunk: int = 1 << 20) -> int:
    """Stream a body without a token until the server answers; its status code."""
    head = (
        "POST /api/submissions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {declared}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        block = b"x" * chunk
        try:
            for _ in range(declared // chunk):
                s.sendall(block)
        except OSError:
            pass  # refused on the header and closed while we were still sending
        data = s.recv(4096)
    return int(data.split(b" ", 2)[1]) if data else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--submissions", type=int, default=100)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--bomb-rounds", type=int, default=3, help="passes over the list of bombs (bounded loop)")
    ap.add_argument("--workers", type=int, default=0, help="then score the queue with N workers (0: skip)")
    args = ap.parse_args()

    import httpx
    from service_support import (
        Server,
        add_team,
        gzip_bomb,
        make_service,
        many_member_zip,
        parquet_rows_bomb,
        predictions_csv,
        tar_gz,
        worker_process,
    )

    print("building the bombs ...", flush=True)
    bombs = [
        ("synthetic", "gzip-1GiB.tar.gz", gzip_bomb(1 << 30)),
        ("synthetic", "members-150k.tar.gz", tar_gz({}, n_empty=150_000)),
        ("synthetic", "members-60k.zip", many_member_zip(60_000)),
        ("predictions", "rows-10M.parquet", parquet_rows_bomb(10_000_000)),
    ]
    for _, name, data in bombs:
        assert len(data) <= UPLOAD_CAP, (name, len(data))

    tmp = Path(tempfile.mkdtemp(prefix="medsynbench-perf-"))
    try:
        n_total = 2 * args.submissions
        config = make_service(tmp, limits={"quota_submissions": n_total + 1, "max_upload_bytes": UPLOAD_CAP})
        tokens = [add_team(config, f"team{i}") for i in range(args.clients)]
        attacker = add_team(config, "attacker")
        files = [predictions_csv(config, seed=i) for i in range(args.clients)]
        with Server(config) as srv:
            pid = srv.proc.pid

            def uploads() -> tuple[float, list[float], list[int]]:
                latencies: list[float] = []

                def one(i: int) -> int:
                    k = i % args.clients
                    t0 = time.perf_counter()
                    r = httpx.post(
                        f"{srv.url}/api/submissions",
                        headers={"Authorization": f"Bearer {tokens[k]}"},
                        data={"kind": "predictions"},
                        files={"file": ("p.csv", files[k])},
                        timeout=300,
                    )
                    latencies.append(time.perf_counter() - t0)
                    return r.status_code

                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as ex:
                    codes = list(ex.map(one, range(args.submissions)))
                return time.perf_counter() - t0, latencies, codes

            def report(label: str, wall: float, lat: list[float], codes: list[int]) -> float:
                q = statistics.quantiles(lat, n=100)
                rate = args.submissions / wall
                print(
                    f"{label}: {args.submissions} uploads from {args.clients} clients in {wall:.1f} s = "
                    f"{rate:.1f}/s; latency p50 {q[49] * 1000:.0f} ms, p95 {q[94] * 1000:.0f} ms, "
                    f"max {max(lat) * 1000:.0f} ms; non-202: {sum(c != 202 for c in codes)}; "
                    f"API peak memory {peak_rss_mb(pid):.0f} MB"
                )
                return rate

            print(f"API at start: peak memory {peak_rss_mb(pid):.0f} MB")
            quiet = report("quiet", *uploads())
            codes_all: list[int] = []
            outcomes: list[tuple[str, int, float]] = []
            stop = threading.Event()

            def bomber() -> None:
                with httpx.Client(base_url=srv.url, timeout=300) as c:
                    for _ in range(args.bomb_rounds):
                        for kind, name, data in bombs:
                            if stop.is_set():
                                return
                            t0 = time.perf_counter()
                            r = c.post(
                                "/api/submissions",
                                headers={"Authorization": f"Bearer {attacker}"},
                                data={"kind": kind},
                                files={"file": (name, data)},
                            )
                            outcomes.append((name, r.status_code, time.perf_counter() - t0))
                        t0 = time.perf_counter()
                        code = unauthenticated_flood(srv.port)
                        outcomes.append(("no-token-2GiB", code, time.perf_counter() - t0))

            b = threading.Thread(target=bomber, daemon=True)
            b.start()
            wall, lat, codes = uploads()
            codes_all += codes
            loud = report("under bombs", wall, lat, codes)
            b.join()  # the bounded loop ends on its own
            stop.set()
            print(f"throughput under bombs / quiet: {loud / quiet:.2f}")
            by: dict[tuple[str, int], list[float]] = {}
            for name, code, t in outcomes:
                by.setdefault((name, code), []).append(t)
            for (name, code), ts in sorted(by.items()):
                print(f"  bomb {name}: {len(ts)} x {code}, {statistics.median(ts) * 1000:.0f} ms median")
            refused = all(code in (400, 401, 413) for _, code, _ in outcomes)
            print(
                f"every bomb refused: {refused}; API peak memory after both phases {peak_rss_mb(pid):.0f} MB"
            )
            ok = refused and all(c == 202 for c in codes_all)
            if args.workers:
                t1 = time.perf_counter()
                ws = [worker_process(config, "--drain") for _ in range(args.workers)]
                for w in ws:
                    w.communicate(timeout=3600)
                from bench.service import db
                from bench.service.host import Host

                host = Host.from_file(config)
                with host.sessions() as s:
                    scored = s.query(db.Submission).filter_by(status=db.SCORED).count()
                host.dispose()
                sw = time.perf_counter() - t1
                print(f"scoring: {scored}/{n_total} scored by {args.workers} workers in {sw:.1f} s")
                ok = ok and scored == n_total
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
