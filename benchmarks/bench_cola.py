"""COLA end to end against plain N-view encoding, side by side in one run, with one open_clip architecture.

Both sides classify the same B images with the same image encoder (random weights: speed does not depend on them):

* **encoding only**: the B × N views, already made, through ``encode_image`` (the least any N-view method pays);
* **COLA**: everything COLA does from the pixels: making the N views (random resized crops + flips), encoding
  them, projecting onto the text subspace (rank C), entropy weights, the cost to K classes × M descriptions and the
  batched Sinkhorn solve over all B × K problems, then the argmin.

It prints both throughputs (images/s), their ratio (COLA ÷ encoding; the issue's target is ≥ 0.8) and where COLA's
extra time goes (views, projection + cost + Sinkhorn), and writes ``--json``.

In the same run, the cost of each defence relative to the undefended zero-shot CLIP on the same images (one
forward pass, cosine to the K class prototypes), the comparison of COLA's efficiency table: COLA at this N and M,
and TTC (``rclip.methods.ttc``, its published setting: a random start and 2 counterattack steps of 1/255 within
4/255, each a forward and backward pass). The paper's figures (ImageNet, ViT-B/32, batch 128, one RTX 3090: CLIP
10 min, TTC 40 min, COLA 28 min, i.e. 4.0x and 2.8x) are printed beside ours.

    python benchmarks/bench_cola.py --device cuda --json cola-cuda.json            # ViT-B-32, B=256, K=1000
    python benchmarks/bench_cola.py --device cpu --B 8 --K 100 --threads 2           # a CPU-sized run
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform

import torch
import torch.nn.functional as F

from rclip import models
from rclip.methods.cola import COLA, COLAConfig, random_views
from rclip.methods.ttc import TTC, TTCConfig
from rclip.zeroshot import ZeroShotClassifier

import common  # benchmarks/common.py


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--B", type=int, help="images per batch (default 256 on cuda, 8 on cpu)")
    p.add_argument("--K", type=int, help="classes (default 1000 on cuda, 100 on cpu)")
    p.add_argument("--N", type=int, default=5, help="views per image")
    p.add_argument("--M", type=int, default=50, help="text features per class")
    p.add_argument("--C", type=int, default=256, help="projection rank")
    p.add_argument("--amp", action="store_true", help="encode under bf16 autocast on CUDA (both sides)")
    p.add_argument("--repeat", type=int, default=3)
    common.add_run_options(p)
    args = common.parse(p, argv)
    cpu = args.device == "cpu"
    args.B = args.B or (8 if cpu else 256)
    args.K = args.K or (100 if cpu else 1000)
    device = torch.device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    torch.manual_seed(args.seed)
    bundle = models.load(args.model, device=device)
    size, dim = bundle.image_size, bundle.meta["embed_dim"]
    g = torch.Generator().manual_seed(args.seed)
    texts = F.normalize(torch.randn(args.K, args.M, dim, generator=g), dim=-1)
    images = torch.rand(args.B, 3, size, size, generator=g).to(device)
    cfg = COLAConfig(n_views=args.N, n_components=min(args.C, dim, args.K * args.M), seed=args.seed)
    cola = COLA(bundle, texts, cfg).eval()
    views = random_views(images, args.N, crop_scale=cfg.crop_scale, generator=torch.Generator().manual_seed(0))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.amp and not cpu else contextlib.nullcontext())
    name = torch.cuda.get_device_name() if not cpu else platform.processor() or "cpu"
    print(f"{args.model} ({size} px, D={dim}) on {args.device} ({name}, {torch.get_num_threads()} CPU threads); "
          f"B={args.B} images, N={args.N} views, K={args.K} classes x M={args.M} texts, C={cfg.n_components}, "
          f"Sinkhorn eps={cfg.reg}, max_iter={cfg.max_iter}{', bf16 autocast' if args.amp else ''}")

    with torch.no_grad(), autocast:
        enc_s, enc_all, _ = common.timed(lambda: bundle.model.encode_image(bundle.normalize(views.flatten(0, 1))),
                                  device, args.repeat)
        cola_s, cola_all, logits = common.timed(lambda: cola(images).argmax(1), device, args.repeat)
        views_s, _, _ = common.timed(lambda: random_views(images, args.N, crop_scale=cfg.crop_scale,
                                                   generator=torch.Generator().manual_seed(0)), device, args.repeat)
        feats = cola.view_features(images)
        ot_s, _, _ = common.timed(lambda: cola.feature_distances(feats).argmin(1), device, args.repeat)
    clip = ZeroShotClassifier(bundle, F.normalize(texts.mean(1), dim=-1).to(device)).eval()
    ttc = TTC(clip, TTCConfig())
    with torch.no_grad(), autocast:
        clip_s, _, _ = common.timed(lambda: clip(images).argmax(1), device, args.repeat)
    with autocast:
        ttc_s, _, _ = common.timed(lambda: ttc(images).argmax(1), device, args.repeat)   # counterattacks: gradients
    enc_rate, cola_rate = args.B / enc_s, args.B / cola_s
    ratio = cola_rate / enc_rate
    print(f"encoding only: {enc_s * 1e3:.1f} ms per batch = {enc_rate:,.1f} images/s")
    print(f"COLA:          {cola_s * 1e3:.1f} ms per batch = {cola_rate:,.1f} images/s "
          f"(of which, timed alone: making the views {views_s * 1e3:.1f} ms; entropy weights + cost + Sinkhorn over "
          f"{args.B * args.K} problems + argmin {ot_s * 1e3:.1f} ms)")
    print(f"throughput ratio COLA / encoding only: {ratio:.3f} (target >= 0.8)")
    print(f"cost relative to the undefended CLIP ({clip_s * 1e3:.1f} ms per batch): COLA {cola_s / clip_s:.2f}x "
          f"(paper 2.8x), TTC {ttc_s / clip_s:.2f}x (paper 4.0x) [{ttc_s * 1e3:.1f} ms]; "
          f"COLA / TTC {cola_s / ttc_s:.2f} (paper 0.70)")
    if args.json:
        out = dict(bench="cola", model=args.model, device=args.device, device_name=name,
                   threads=torch.get_num_threads(), B=args.B, N=args.N, K=args.K, M=args.M, C=cfg.n_components,
                   amp=args.amp, encode_seconds=enc_s, encode_seconds_all=enc_all, cola_seconds=cola_s,
                   cola_seconds_all=cola_all, views_seconds=views_s, ot_seconds=ot_s, encode_images_per_s=enc_rate,
                   cola_images_per_s=cola_rate, ratio=ratio, clip_seconds=clip_s, ttc_seconds=ttc_s,
                   cola_vs_clip=cola_s / clip_s, ttc_vs_clip=ttc_s / clip_s, paper_cola_vs_clip=2.8,
                   paper_ttc_vs_clip=4.0, versions=dict(torch=torch.__version__))
        common.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
