"""OT fusion of open_clip Vision Transformers: ours against the same fusion with POT's solvers, side by side in one run.

Three jobs on one architecture (default ``ViT-B-32``, random weights; speed does not depend on them):

* **pair, hard** and **pair, soft**: fuse two image towers (``rclip.methods.fusion.fuse_visual``, weights as
  neurons, heads matched as wholes, one residual-stream map; soft: Sinkhorn τ = 0.08);
* **3 × 3 hierarchy**: HOT-CLIP's fusion steps only — three L-level fusions of three towers, then the V-level
  fusion of their results (soft, as in the paper).

The towers are noisy neuron-permuted copies of one random tower (``--noise``: Gaussian noise of that fraction of each
tensor's standard deviation, after a random permutation of the residual stream, heads, dimensions within heads and
MLP units), so every layer's OT problem has a structure to find, as between related models. Each job runs
with ``solver="rclip"`` (hard: each row's cheapest column where those form a permutation, else
``scipy.optimize.linear_sum_assignment``; soft: one batched
``rclip.ot.sinkhorn`` call per layer, on ``--device``) and with ``solver="pot"`` (POT's ``ot.emd`` /
``ot.sinkhorn(method="sinkhorn_log")``, one problem at a time, numpy float64 on the CPU): everything else is the same
code. The two run alternately ``--repeat`` times (default 2) and each keeps its fastest run (all runs are listed):
on a 2-core CPU runs of the same code differed by up to 1.6x, and one run each, ours always first, favoured POT.
It prints both wall times, their ratio, the share spent computing transport plans, the ratio ours would reach if
our plans cost nothing (POT's total over ours without its plan time: the ceiling any solver has, since everything else
is shared), and checks that the two fused models agree and that hard fusion recovers the permutation (noise 0: the
original exactly).

    python benchmarks/bench_fusion.py --device cuda --json fusion-cuda.json         # targets: pair <= 5 s, 3x3 <= 30 s
    python benchmarks/bench_fusion.py --device cpu --threads 2 --json fusion-cpu.json
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import ot as pot
import torch

import rclip.methods.fusion as fusion
from rclip import models
from rclip.methods.fusion import FusionConfig, fuse_visual, permute_visual, visual_state

import common  # benchmarks/common.py


class PlanTimer:
    """Wraps ``fusion.transport_plans`` to add up the seconds spent computing plans (synchronising CUDA), and
    ``fusion.sinkhorn`` to record the most iterations any of our soft solves ran."""

    def __init__(self):
        self.seconds, self.calls, self.problems, self.sinkhorn_iter = 0.0, 0, 0, 0
        self._inner = fusion.transport_plans
        self._sinkhorn = fusion.sinkhorn

    def sinkhorn(self, *args, **kwargs):
        res = self._sinkhorn(*args, **kwargs)
        self.sinkhorn_iter = max(self.sinkhorn_iter, res.n_iter)
        return res

    def __call__(self, cost, cfg, solver="rclip", tally=None):
        common.sync(cost.device)
        start = time.perf_counter()
        out = self._inner(cost, cfg, solver, tally)
        common.sync(cost.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.problems += cost.shape[0]
        return out


def related(state, heads, seed, noise, device, with_perms=False):
    """A neuron-permuted copy of ``state`` with relative Gaussian noise (and the permutations, if asked)."""
    copy_, perms = permute_visual(state, heads, seed=seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {k: (v + noise * v.float().std().nan_to_num(0) * torch.randn(v.shape, generator=g)).to(device)
           for k, v in copy_.items()}
    return (out, perms) if with_perms else out


def run_job(name, make_groups, cfg, heads, solver, device):
    """Fuse each group, then (if several) their results; returns (seconds, plan seconds, plan problems, fused
    state, the last FusionResult, the most iterations of our Sinkhorn solves)."""
    timer = PlanTimer()
    fusion.transport_plans, fusion.sinkhorn = timer, timer.sinkhorn
    try:
        total = 0.0
        results = []
        for group in make_groups():                 # towers are made outside the timed region
            common.sync(device)
            start = time.perf_counter()
            last = fuse_visual(group, cfg=cfg, heads=heads, device=device)
            results.append(last.state)
            common.sync(device)
            total += time.perf_counter() - start
            del group
        if len(results) > 1:
            common.sync(device)
            start = time.perf_counter()
            last = fuse_visual(results, cfg=cfg, heads=heads, device=device)
            final = last.state
            common.sync(device)
            total += time.perf_counter() - start
        else:
            final = results[0]
    finally:
        fusion.transport_plans, fusion.sinkhorn = timer._inner, timer._sinkhorn
    return total, timer.seconds, timer.problems, final, last, timer.sinkhorn_iter


def max_rel_diff(a, b):
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)).item() for k in a)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="ViT-B-32", help="an open_clip architecture or rclip config (random weights)")
    p.add_argument("--noise", type=float, default=0.3, help="relative noise on the permuted copies")
    p.add_argument("--reg", type=float, default=0.08, help="tau of soft alignment (squared distances, [0, 4])")
    p.add_argument("--max-iter", type=int, default=2000, help="Sinkhorn iteration cap (both solvers)")
    p.add_argument("--jobs", default="pair-hard,pair-soft,hierarchy", help="comma-separated subset to run")
    p.add_argument("--skip-pot", default="", help="comma-separated jobs to time without the POT peer (slow on CPU)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each job per solver, alternating; the fastest kept")
    common.add_run_options(p)
    args = common.parse(p, argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    bundle = models.load(args.model)
    heads = bundle.model.visual.transformer.resblocks[0].attn.num_heads
    base = visual_state(bundle)
    del bundle
    n_params = sum(v.numel() for v in base.values())
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{args.model} image tower: {n_params / 1e6:.1f} M parameters, {heads} heads; towers: noisy permuted copies "
          f"(noise {args.noise}); {args.device} ({device_name}, {torch.get_num_threads()} CPU threads)")

    partner, perms = related(base, heads, args.seed + 1, args.noise, device, with_perms=True)

    def pair():
        yield [base, partner]

    def hierarchy():
        for a in range(3):
            yield [related(base, heads, args.seed + 10 * a + t, args.noise, device) for t in range(3)]

    jobs = {"pair-hard": (pair, FusionConfig("hard")),
            "pair-soft": (pair, FusionConfig("soft", reg=args.reg, max_iter=args.max_iter)),
            "hierarchy": (hierarchy, FusionConfig("soft", reg=args.reg, max_iter=args.max_iter))}
    wanted = [j for j in args.jobs.split(",") if j]
    skip_pot = {j for j in args.skip_pot.split(",") if j}
    out = {"bench": "fusion", "model": args.model, "params_m": n_params / 1e6, "device": args.device,
           "device_name": device_name, "threads": torch.get_num_threads(), "noise": args.noise, "reg": args.reg,
           "max_iter": args.max_iter, "jobs": {},
           "versions": dict(torch=torch.__version__, pot=pot.__version__, numpy=np.__version__)}
    ok = True
    for name in wanted:
        make, cfg = jobs[name]
        # ours and POT's alternately, --repeat times, the fastest run of each kept: single runs are noisy on a CPU
        runs, times = {}, {"rclip": [], "pot": []}
        for _ in range(args.repeat):
            for solver in ["rclip"] + (["pot"] if name not in skip_pot else []):
                run = run_job(name, make, cfg, heads, solver, device)
                times[solver].append(round(run[0], 2))
                if solver not in runs or run[0] < runs[solver][0]:
                    runs[solver] = run             # only the fastest is kept: a fused model and its maps take GBs
                del run
        secs, plan_s, problems, ours, result, iters = runs.pop("rclip")
        row = {"ours_s": secs, "ours_plan_s": plan_s, "plan_problems": problems, "sinkhorn_max_iter": iters,
               "runs": args.repeat, "ours_runs_s": times["rclip"], "pot_runs_s": times["pot"]}
        line = f"{name:10s} ours {secs:7.2f} s ({plan_s / secs:4.0%} in plans, {problems} OT problems" + \
            (f", Sinkhorn at most {iters} iterations)" if cfg.alignment == "soft" else ")")
        if name == "pair-hard":      # the maps found must be the permutations that made the partner
            found = all(torch.equal(result.maps[m][1].argmax(1).cpu(), perms[k]) for m, k in
                        [("residual", "residual")] + [(f"block{i}.{t}", f"{t}{i}") for i in range(len(perms) // 3)
                                                      for t in ("qk", "v")] +
                        [(f"block{i}.fc", f"mlp{i}") for i in range(len(perms) // 3)])
            row["permutations_recovered"] = found
            ok &= found
            line += f"; permutations recovered: {found}"
        if name not in skip_pot:
            fusion_pot = runs.pop("pot")
            diff = max_rel_diff(ours, fusion_pot[3])
            agree = diff < (1e-5 if cfg.alignment == "hard" else 1e-3)
            ok &= agree
            # what any solver could give: POT's total against ours with the plans free (the rest is shared code)
            bound = fusion_pot[0] / max(secs - plan_s, 1e-9)
            row.update(pot_s=fusion_pot[0], pot_plan_s=fusion_pot[1], ratio=fusion_pot[0] / secs,
                       plan_ratio=fusion_pot[1] / max(plan_s, 1e-9), ratio_if_plans_free=bound,
                       rel_diff_vs_pot=diff, agree=agree)
            line += (f" | with POT's solvers {fusion_pot[0]:7.2f} s ({fusion_pot[1]:.2f} s in plans) -> "
                     f"{row['ratio']:.1f}x overall, {row['plan_ratio']:.1f}x on the plans, at most {bound:.2f}x "
                     f"with plans that cost nothing; fused models agree: {agree} ({diff:.1e})")
        out["jobs"][name] = row
        print(line, flush=True)
    common.write_json(args.json, out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
