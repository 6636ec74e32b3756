"""Nearest-neighbour search of the privacy audit: blocked torch search vs scikit-learn NearestNeighbors.

Times both on the same random L2-normalized features (n queries x n references x dim), checks that the
neighbours agree, measures peak memory, and extrapolates to a study-sized search (default 100,000 x 100,000) from
the measured throughput: the work grows as n_query x n_ref x dim, the blocked search's working memory does not.

Each method runs in its own process, so its peak resident memory (getrusage ru_maxrss) above the memory held before
the search (inputs, libraries) is its own; tracemalloc's peak (numpy allocations only) is reported beside it.

    python scripts/perf_privacy.py --n 20000 --dim 128
    python scripts/perf_privacy.py --n 5000 --dim 256 --threads 2 --target 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _features(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def worker(args: argparse.Namespace) -> int:
    """One method in this process; writes its neighbours to --result and prints its figures as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    q, r = _features(args.n, args.dim, 1), _features(args.n, args.dim, 2)
    if args.worker == "torch":
        from bench.privacy import nearest_neighbors

        def search(a, b):
            return nearest_neighbors(a, b, block=args.block, ref_block=args.ref_block, device=args.device)
    else:
        from sklearn.neighbors import NearestNeighbors

        alg = args.worker.split(":", 1)[1]

        def search(a, b):
            d, i = NearestNeighbors(n_neighbors=1, algorithm=alg).fit(b).kneighbors(a)
            return d[:, 0], i[:, 0]

    search(q[:64], r[:256])  # warm-up: thread pools, kernels
    before = max(_rss_mib(), _maxrss_mib())
    tracemalloc.start()
    t0 = time.perf_counter()
    d, i = search(q, r)
    if args.device and args.device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "seconds": secs,
        "peak_rss_above_inputs_mib": max(0.0, _maxrss_mib() - before),
        "tracemalloc_peak_mib": tm_peak / 2**20,
    }
    if args.device and args.device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    np.savez(args.result, d=d, i=i)
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="queries and references (each)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=2048, help="query rows per tile")
    ap.add_argument("--ref-block", type=int, default=8192, help="reference rows per tile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--target", type=int, default=100000, help="size to extrapolate to")
    ap.add_argument(
        "--sklearn", default="brute", help="sklearn algorithm(s), comma-separated: brute,kd_tree,ball_tree"
    )
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    methods = ["torch"] + [f"sklearn:{a.strip()}" for a in args.sklearn.split(",") if a.strip()]
    rep: dict = {"n": args.n, "dim": args.dim, "threads": args.threads, "device": args.device or "auto"}
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            path = Path(tmp) / f"{m.replace(':', '_')}.npz"
            cmd = [sys.executable, __file__, "--worker", m, "--result", str(path)]
            for k in ("n", "dim", "block", "ref_block", "threads"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            if args.device:
                cmd += ["--device", args.device]
            p = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rep[m] = json.loads(p.stdout.strip().splitlines()[-1])
            res[m] = np.load(path)
    t = res["torch"]
    rep["torch"]["tile_mib"] = 4 * min(args.block, args.n) * min(args.ref_block, args.n) / 2**20
    scale = (args.target / args.n) ** 2
    rep["extrapolated"] = {
        "target": args.target,
        "torch_seconds": rep["torch"]["seconds"] * scale,
        "torch_working_mib": rep["torch"]["tile_mib"],
        "input_features_mib": 2 * args.target * args.dim * 4 / 2**20,
    }
    for m in methods[1:]:
        s = res[m]
        rep[m]["index_agreement"] = float(np.mean(s["i"] == t["i"]))
        rep[m]["max_abs_distance_diff"] = float(np.max(np.abs(s["d"] - t["d"])))
        rep[m]["time_ratio_sklearn_over_torch"] = rep[m]["seconds"] / rep["torch"]["seconds"]
        rep["extrapolated"][f"{m}_seconds"] = rep[m]["seconds"] * scale
    print(json.dumps(rep, indent=2))
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.io import write_json

        write_json(args.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
