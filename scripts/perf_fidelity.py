"""Speed and memory of the tiled PRDC and KID against plain NumPy / scikit-learn, measured in the same run.

    python scripts/perf_fidelity.py                      # N = 50,000 per set, d = 512 (the GPU-sized check)
    python scripts/perf_fidelity.py --n 5000 --ref-n 5000

Ours: `bench.metrics.fidelity.prdc` (k-NN radii and ball membership over tile x tile blocks) and
`mmd2_unbiased` (the full-set unbiased KID kernel sums, tiled), on the GPU when there is one. Working memory is
about 4 * tile^2 bytes per block plus the features, independent of N.

Reference: scikit-learn `NearestNeighbors` for the k-NN radii and `pairwise_distances` for the real x synthetic
matrix (PRDC as Naeem et al. write it), `sklearn.metrics.pairwise.polynomial_kernel` for KID; these hold N x N
matrices, so at N = 50,000 they need ~20 GB per matrix and take long. The reference therefore runs at `--ref-n`
(default: min(N, 5000)); when that is below N its time is extrapolated quadratically (both are O(N^2 d)) and the
ratio is printed for both the measured size and N. Agreement of the two at `--ref-n` is checked.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.metrics import fidelity as F  # noqa: E402


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    from sklearn.metrics import pairwise_distances
    from sklearn.neighbors import NearestNeighbors

    rr = NearestNeighbors(n_neighbors=k + 1).fit(real).kneighbors(real)[0][:, k]
    rf = NearestNeighbors(n_neighbors=k + 1).fit(fake).kneighbors(fake)[0][:, k]
    d = pairwise_distances(real, fake)
    inside = d <= rr[:, None]
    return {
        "precision": float(inside.any(0).mean()),
        "recall": float((d <= rf[None, :]).any(1).mean()),
        "density": float(inside.sum(0).mean() / k),
        "coverage": float(inside.any(1).mean()),
    }


def reference_mmd(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics.pairwise import polynomial_kernel

    d = x.shape[1]
    m, n = len(x), len(y)
    kxx = polynomial_kernel(x, degree=3, gamma=1.0 / d, coef0=1)
    kyy = polynomial_kernel(y, degree=3, gamma=1.0 / d, coef0=1)
    kxy = polynomial_kernel(x, y, degree=3, gamma=1.0 / d, coef0=1)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="points per set for the tiled implementation")
    ap.add_argument("--ref-n", type=int, help="points per set for the reference (default min(N, 5000))")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=F.K_NN)
    ap.add_argument("--tile", type=int, default=F.TILE)
    ap.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args(argv)
    import torch

    dev = F._device(args.device)
    ref_n = min(args.n, args.ref_n or 5000)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    fake = (rng.normal(size=(args.n, args.dim)) * 1.1 + 0.05).astype(np.float32)
    print(
        f"device {dev}; torch threads {torch.get_num_threads()}; N = {args.n:,} per set, d = {args.dim}, "
        f"k = {args.k}, tile = {args.tile} (block memory ~{4 * args.tile**2 / 2**20:.0f} MiB per tile matrix)"
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = {}
    for name, fn in (
        ("prdc", lambda a, b: F.prdc(a, b, args.k, tile=args.tile, device=str(dev))),
        ("kid", lambda a, b: F.mmd2_unbiased(a, b, tile=args.tile, device=str(dev))),
    ):
        _, t_small = _timed(fn, real[:ref_n], fake[:ref_n])
        out, t_big = _timed(fn, real, fake) if args.n > ref_n else (None, t_small)
        results[name] = {"ours_ref_n": t_small, "ours_n": t_big, "ours_value": out}
        print(f"ours  {name}: {t_small:8.2f} s at N={ref_n:,}; {t_big:8.2f} s at N={args.n:,}")
    if dev.type == "cuda":
        print(f"ours: peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak host memory so far {_peak_rss_mb():.0f} MiB")
    if args.skip_reference:
        return 0
    a, b = real[:ref_n].astype(np.float64), fake[:ref_n].astype(np.float64)
    ref_prdc, t_prdc = _timed(reference_prdc, a, b, args.k)
    ref_kid, t_kid = _timed(reference_mmd, a, b)
    ours_prdc = F.prdc(real[:ref_n], fake[:ref_n], args.k, tile=args.tile, device=str(dev))
    ours_kid = F.mmd2_unbiased(real[:ref_n], fake[:ref_n], tile=args.tile, device=str(dev))
    for m in ref_prdc:
        assert abs(ours_prdc[m].value - ref_prdc[m]) < 2e-3, (m, ours_prdc[m].value, ref_prdc[m])
    assert abs(ours_kid - ref_kid) < 1e-3 * max(1.0, abs(ref_kid)), (ours_kid, ref_kid)
    print(f"agreement at N={ref_n:,}: PRDC {ref_prdc}; KID ours {ours_kid:.6f} vs reference {ref_kid:.6f}")
    scale = (args.n / ref_n) ** 2
    for name, t_ref in (("prdc", t_prdc), ("kid", t_kid)):
        r = results[name]
        line = f"ref   {name}: {t_ref:8.2f} s at N={ref_n:,} -> speed-up x{t_ref / r['ours_ref_n']:.1f}"
        if args.n > ref_n:
            est = t_ref * scale
            line += f"; extrapolated {est:,.0f} s at N={args.n:,} -> speed-up x{est / r['ours_n']:.1f}"
        print(line)
    print(f"peak host memory {_peak_rss_mb():.0f} MiB (the reference holds N x N float64 matrices)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
