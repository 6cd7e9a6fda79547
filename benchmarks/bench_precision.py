"""Does the fast engine's bf16 training change what the chapters' models can do? And what does it buy on a real run?

Trains the two kinds of model whose training the fast engine changes, each under ``RCLIP_ENGINE=plain`` (fp32 on the
CPU) and ``fast`` (bf16 autocast of the forward, math attention, fused AdamW), from the same seed on the same data,
plus a second plain run with another seed (how much two fp32 runs differ by chance alone):

1. **TeCoA with the chapters' shared schedule** (chapters 1 and 2: the shipped world CLIP's image tower fine-tuned
   on the world's colour x shape training images, ``profiles/world.yml`` ``shared.finetune``; inner PGD in fp32);
   scored on the world's *validation* split: clean zero-shot top-1 and top-1 under PGD-10 at 4/255, every task.
2. **Continued contrastive pre-training** (chapter 4's fine-tuning threat without the poison: the shipped world CLIP
   on a new crawl, batch 128, lr 5e-4); scored by clean zero-shot top-1 on the validation split, every task.

For each it prints the wall time of both trainings (the speed-up a chapter sees), both models' accuracies with their
intervals, and the paired comparison fast − plain over the same validation images (the claims engine: bootstrap
interval, non-inferiority at ``--margin`` points), beside the same comparison between the two plain seeds. The
fast engine passes where fast − plain is no worse than ``--margin`` and its accuracy lies within the plain model's
95 % interval.

    python benchmarks/bench_precision.py --threads 2 --json precision-cpu.json          # about 10 min on 2 cores
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

import common
from rclip import claims, engine, models, world, zeroshot
from rclip.attacks.image import pgd
from rclip.chapter import finetune_config
from rclip.methods.robust_finetune import adversarial_finetune
from rclip.profiles import load_profile
from rclip.train import TrainConfig, pretrain

SHARED = load_profile("world")["shared"]["finetune"]       # the published profile's shared schedule


def train_tecoa(base, mode: str, seed: int, steps: int):
    """TeCoA as chapters 1 and 2 configure it (:func:`rclip.chapter.finetune_config`), ``steps`` long."""
    settings = {**SHARED, "steps": steps}
    data = world.WorldLabelled(settings["task"], settings["n"], split="train", resolution=base.image_size, seed=0)
    task = world.zeroshot_task(settings["task"], n=1, resolution=base.image_size)
    weights = zeroshot.class_embeddings(base, zeroshot.class_prompts(task))
    cfg = finetune_config({"finetune": settings, "seed": seed}, "tecoa")
    tuned = base.copy()
    with engine.use(mode), tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        adversarial_finetune(tuned, data, cfg, run_dir, class_weights=weights, progress=False)
        seconds = time.perf_counter() - t0
    return tuned, seconds


def train_contrastive(base, mode: str, seed: int, n_pairs: int, epochs: int):
    pairs = world.WorldPairs(n_pairs, resolution=base.image_size, seed=1)      # a new crawl (the CLIP saw seed 0's)
    steps = epochs * n_pairs // 128
    cfg = TrainConfig(steps=steps, batch_size=128, lr=5e-4, min_lr=5e-6, warmup_steps=20, ckpt_every=10 ** 9,
                      log_every=10 ** 9, seed=seed)
    tuned = base.copy()
    tuned.model.requires_grad_(True)
    with engine.use(mode), tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        pretrain(tuned, pairs, cfg, run_dir, progress=False)
        seconds = time.perf_counter() - t0
    return tuned, seconds


def scores(bundle, n: int, robust: bool) -> dict[str, np.ndarray]:
    """Per-image correctness (0 / 100) on the validation split of every world task, clean and (optionally) under
    PGD-10 at 4/255, concatenated over tasks."""
    out = {"clean": [], "pgd": []}
    for name in world.TASK_NAMES:
        task = world.zeroshot_task(name, split="val", n=n, resolution=bundle.image_size)
        x, y = task.tensors()
        clf = zeroshot.zeroshot_classifier(bundle, task)
        out["clean"].append(zeroshot.correct(clf, x, y))
        if robust:
            out["pgd"].append(zeroshot.correct(clf, pgd(clf, x, y, 4 / 255, steps=10, batch_size=250), y))
    return {k: 100.0 * torch.cat(v).double().numpy() for k, v in out.items() if v}


def compare(name: str, metric: str, runs: dict, margin: float) -> dict:
    """fast − plain (same seed) and plain seed 1 − plain seed 0 on the same images; the pass rule."""
    plain, fast, other = (runs[k][metric] for k in ("plain", "fast", "plain seed 1"))
    engine_diff = claims.compare(f"{name}: fast engine no worse than plain by more than {margin:g} points ({metric})",
                                 fast, plain, metric=f"top-1 (%), {metric}", source="book", labels=("fast", "plain"),
                                 tolerance=margin, items="validation images")
    seed_diff = claims.compare(f"{name}: plain, seed 1 vs seed 0 ({metric})", other, plain,
                               metric=f"top-1 (%), {metric}", source="book", labels=("seed 1", "seed 0"),
                               items="validation images")
    plain_ci = claims.proportion(int(round(plain.sum() / 100)), len(plain))
    fast_acc = float(fast.mean())
    within = plain_ci["ci_low"] - 1e-9 <= fast_acc <= plain_ci["ci_high"] + 1e-9     # Wilson's 0 is 1e-16
    return {"metric": metric, "n": len(plain), "plain": plain_ci, "fast": float(fast.mean()),
            "plain_seed_1": float(other.mean()), "fast_minus_plain": engine_diff, "seed_1_minus_seed_0": seed_diff,
            "fast_within_plain_ci": within,
            "passes": bool(within and engine_diff["verdict"] == "reproduced")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="validation images per task (5 tasks)")
    p.add_argument("--tecoa-steps", type=int, default=SHARED["steps"], help="default: the profile's")
    p.add_argument("--pairs", type=int, default=10240, help="pairs of the new crawl for continued pre-training")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--margin", type=float, default=2.0, help="non-inferiority margin, points of top-1")
    common.add_run_options(p)
    args = common.parse(p, argv)
    base = models.load("world", device="cpu")
    report, ok = {}, True
    for name, train, robust in (("TeCoA (shared schedule)", lambda m, s: train_tecoa(base, m, s, args.tecoa_steps),
                                 True),
                                ("continued pre-training", lambda m, s: train_contrastive(base, m, s, args.pairs,
                                                                                          args.epochs), False)):
        runs, seconds = {}, {}
        for label, mode, seed in (("plain", "plain", 0), ("fast", "fast", 0), ("plain seed 1", "plain", 1)):
            model, seconds[label] = train(mode, seed)
            runs[label] = scores(model, args.n, robust)
            print(f"{name}: {label} trained in {seconds[label]:.1f} s", flush=True)
        entry = {"seconds": seconds, "training_speedup": seconds["plain"] / seconds["fast"], "metrics": {}}
        print(f"{name}: training {seconds['plain']:.1f} s plain vs {seconds['fast']:.1f} s fast "
              f"({entry['training_speedup']:.2f}x)")
        for metric in runs["plain"]:
            c = compare(name, metric, runs, args.margin)
            entry["metrics"][metric] = c
            d, s = c["fast_minus_plain"], c["seed_1_minus_seed_0"]
            print(f"  {metric:5s} n {c['n']}: plain {c['plain']['estimate']:.1f} ({c['plain']['ci_low']:.1f}, "
                  f"{c['plain']['ci_high']:.1f}), fast {c['fast']:.1f}, plain seed 1 {c['plain_seed_1']:.1f}; "
                  f"fast - plain {d['estimate']:+.1f} ({d['ci_low']:+.1f}, {d['ci_high']:+.1f}) -> {d['verdict']} "
                  f"at margin {args.margin:g}; seed 1 - seed 0 {s['estimate']:+.1f} ({s['ci_low']:+.1f}, "
                  f"{s['ci_high']:+.1f}); {'PASS' if c['passes'] else 'FAIL'}")
            ok &= c["passes"]
        report[name] = entry
    common.write_json(args.json, {"threads": torch.get_num_threads(), "n_per_task": args.n, "margin": args.margin,
                                  "results": report, "passes": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
