"""FID maths: the exact sample-space form (rigface.eval.fid.frechet_distance_samples) against the plain
covariance + scipy.linalg.sqrtm form, for sets smaller than the feature dimension. Prints a table.

    .venv/bin/python bench/eval.py [--dim 512] [--sizes 64 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rigface.eval.fid import frechet_distance, frechet_distance_samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| n per set | dim | sqrtm form (s) | sample form (s) | speed-up | abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.sizes:
        a = rng.normal(size=(n, args.dim))
        b = rng.normal(size=(n, args.dim)) + 0.1
        t = time.perf_counter()
        base = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        fast = frechet_distance_samples(a, b)
        t_fast = time.perf_counter() - t
        print(f"| {n} | {args.dim} | {t_base:.3f} | {t_fast:.4f} | {t_base / t_fast:.0f}x | {abs(base - fast):.2e} |")


if __name__ == "__main__":
    main()
