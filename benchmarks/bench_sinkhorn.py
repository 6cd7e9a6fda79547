"""Batched ``rclip.ot.sinkhorn`` against a per-problem POT loop, side by side in one run.

The problems have COLA's structure: B images × K classes, each an N × M cost 1 - cos between N image-view features
and M class-description features (random unit vectors), with softmax weights a (per image) and b (per class).
Ours solves all B·K problems in one batched call on ``--device``; POT's ``sinkhorn2(method="sinkhorn_log")`` (numpy,
float64, the same reg, tolerance and iteration cap) solves a random subset of them one by one on the CPU, and its
rate is extrapolated to all B·K problems. Stopping rules differ slightly (ours: L1 row-marginal violation, checked
every iteration; POT: L2 column-marginal violation, every 10th), so both reach about the same accuracy.

    python benchmarks/bench_sinkhorn.py --device cuda --json bench.json       # B=256, K=1000, N=5, M=50
    python benchmarks/bench_sinkhorn.py --device cpu --B 32 --K 100 --threads 1   # a CPU-sized run
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import ot as pot
import torch
import torch.nn.functional as F

from rclip.ot import sinkhorn

import common  # benchmarks/common.py

CPU_DEFAULTS = dict(B=32, K=100)     # the paper-scale defaults (256 × 1000) take minutes per solve on a laptop CPU


def make_problems(b, k, n, m, dim, dtype, device, seed):
    """cost (B, K, N, M) = 1 - cos in [0, 2]; a (B, 1, N) and b (1, K, M): softmax weights, broadcast."""
    g = torch.Generator().manual_seed(seed)
    views = F.normalize(torch.randn(b, n, dim, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(k, m, dim, generator=g, dtype=torch.float64), dim=-1)
    cost = 1 - torch.einsum("bnd,kmd->bknm", views, texts)
    wa = torch.randn(b, 1, n, generator=g, dtype=torch.float64).softmax(-1)
    wb = torch.randn(1, k, m, generator=g, dtype=torch.float64).softmax(-1)
    return [x.to(device=device, dtype=dtype) for x in (cost, wa, wb)]


def time_ours(cost, a, b, args):
    def run():
        return common.clock(lambda: sinkhorn(cost, a, b, reg=args.reg, max_iter=args.max_iter, tol=args.tol),
                            cost.device)

    run()                                                          # warm-up (kernels, allocator)
    if cost.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times, res = zip(*(run() for _ in range(args.repeat)))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cost.is_cuda else None
    return list(times), res[-1], peak


def time_pot(cost, a, b, idx, args):
    """POT one problem at a time on numpy float64; returns (seconds for the subset, costs of the subset)."""
    c = cost.double().cpu().numpy()
    wa = a.double().cpu().expand(*c.shape[:2], -1).numpy()
    wb = b.double().cpu().expand(*c.shape[:2], -1).numpy()
    out = np.empty(len(idx))
    start = time.perf_counter()
    for t, (i, j) in enumerate(idx):
        out[t] = pot.sinkhorn2(wa[i, j], wb[i, j], c[i, j], args.reg, method="sinkhorn_log",
                               numItermax=args.max_iter, stopThr=args.tol)
    return time.perf_counter() - start, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, help="images (default 256 on cuda, %(B)d on cpu)" % CPU_DEFAULTS)
    p.add_argument("--K", type=int, help="classes (default 1000 on cuda, %(K)d on cpu)" % CPU_DEFAULTS)
    p.add_argument("--N", type=int, default=5, help="views per image")
    p.add_argument("--M", type=int, default=50, help="descriptions per class")
    p.add_argument("--dim", type=int, default=64, help="feature dimension of the random unit features")
    p.add_argument("--reg", type=float, default=0.1, help="entropic regularisation on 1 - cos (COLA/AWT: 0.1)")
    p.add_argument("--tol", type=float, default=1e-6, help="marginal tolerance for both solvers")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="ours (POT runs float64)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of ours (median reported), after a warm-up")
    p.add_argument("--pot-problems", type=int, default=200, help="random subset POT solves, then extrapolated")
    common.add_run_options(p)
    args = common.parse(p, argv)
    defaults = dict(B=256, K=1000) if args.device == "cuda" else CPU_DEFAULTS
    args.B = args.B or defaults["B"]
    args.K = args.K or defaults["K"]
    n_problems = args.B * args.K

    cost, a, b = make_problems(args.B, args.K, args.N, args.M, args.dim, getattr(torch, args.dtype),
                               args.device, args.seed)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"sizes: B={args.B} images x K={args.K} classes = {n_problems} problems of N={args.N} x M={args.M}; "
          f"reg={args.reg}, tol={args.tol}, max_iter={args.max_iter}; ours {args.dtype} on {args.device} "
          f"({device_name}, {torch.get_num_threads()} CPU threads)")

    times, res, peak = time_ours(cost, a, b, args)
    ours_s = statistics.median(times)
    print(f"ours: {ours_s:.4f} s per batched solve (median of {args.repeat}: "
          f"{', '.join(f'{t:.4f}' for t in times)}), {res.n_iter} iterations, max error {res.error.max():.2e}"
          + (f", peak CUDA memory {peak:.0f} MiB" if peak is not None else ""))

    rng = np.random.default_rng(args.seed)
    pick = rng.choice(n_problems, size=min(args.pot_problems, n_problems), replace=False)
    idx = [divmod(int(t), args.K) for t in pick]
    pot_s, pot_cost = time_pot(cost, a, b, idx, args)
    per_problem = pot_s / len(idx)
    print(f"POT:  {pot_s:.3f} s for a random subset of {len(idx)} problems solved one by one on the CPU "
          f"(numpy float64) = {per_problem * 1e3:.3f} ms per problem; extrapolated to all {n_problems}: "
          f"{per_problem * n_problems:.1f} s")

    ours_cost = res.cost.double().cpu().numpy()[tuple(np.array(idx).T)]
    rel = float(np.max(np.abs(ours_cost - pot_cost) / np.abs(pot_cost)))
    limit = 1e-4 if args.dtype == "float32" else 1e-8
    ours_rate, pot_rate = n_problems / ours_s, 1 / per_problem
    ratio = ours_rate / pot_rate
    print(f"costs agree: {rel <= limit} (max relative difference on the subset {rel:.2e}, limit {limit:.0e})")
    print(f"throughput: ours {ours_rate:,.0f} problems/s, POT {pot_rate:,.0f} problems/s -> ratio {ratio:,.1f}x")

    if args.json:
        out = dict(bench="sinkhorn", device=args.device, device_name=device_name, threads=torch.get_num_threads(),
                   B=args.B, K=args.K, N=args.N, M=args.M, dim=args.dim, reg=args.reg, tol=args.tol,
                   max_iter=args.max_iter, dtype=args.dtype, seed=args.seed, problems=n_problems,
                   ours_seconds=ours_s, ours_seconds_all=times, ours_iterations=res.n_iter,
                   ours_max_error=float(res.error.max()), ours_peak_cuda_mib=peak,
                   pot_subset=len(idx), pot_subset_seconds=pot_s, pot_seconds_per_problem=per_problem,
                   pot_seconds_extrapolated=per_problem * n_problems, ours_problems_per_s=ours_rate,
                   pot_problems_per_s=pot_rate, ratio=ratio, max_rel_diff=rel, agree=rel <= limit,
                   versions=dict(torch=torch.__version__, pot=pot.__version__, numpy=np.__version__))
        common.write_json(args.json, out)
    return 0 if rel <= limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
