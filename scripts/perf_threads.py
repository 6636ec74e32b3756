"""Does a shared CPU collapse the tiny ddpm? Fit time alone and next to competing CPU-bound processes.

    .venv/bin/python scripts/perf_threads.py --steps 200 --threads 1 2 --competitors 0 1 --policy default passive
    .venv/bin/python scripts/perf_threads.py --workload train --steps 300    # the demo's classifier instead

Each cell runs in a fresh process (OpenMP reads OMP_WAIT_POLICY once, when torch is imported); a competitor is
`python -c 'while 1: pass'`, started before the fit and killed after it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import sys, time, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
steps, workload = int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
if workload == "ddpm":
    from bench.generators.ddpm import Ddpm
    x = rng.integers(0, 256, (256, 1, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 6, 256)
    g = Ddpm(config={"preset": "tiny", "train_steps": steps}, seed=0, device="cpu")
    t0 = time.perf_counter()
    g.fit(x, y, 6)
else:  # the classifier of the cpu demo: resnet10t, 32 px, batch 32
    from bench.models import create_model
    torch.manual_seed(0)
    m = create_model("resnet10t", 6, 1)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 6, (32,))
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
print(time.perf_counter() - t0)
"""


def one(threads: int, steps: int, competitors: int, policy: str, workload: str) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    spin = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(competitors)]
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads), str(steps), workload],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=1800,
        )
    finally:
        for p in spin:
            p.kill()
            p.wait()
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workload", choices=["ddpm", "train"], default="ddpm", help="tiny ddpm or resnet10t 32 px"
    )
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--policy", nargs="+", default=["default", "passive"], help="OMP_WAIT_POLICY values")
    args = ap.parse_args(argv)
    rows = []
    for policy, threads, comp in itertools.product(args.policy, args.threads, args.competitors):
        t0 = time.perf_counter()
        secs = one(threads, args.steps, comp, policy, args.workload)
        row = {
            "workload": args.workload,
            "policy": policy,
            "threads": threads,
            "competitors": comp,
            "fit_s": round(secs, 1),
        }
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
