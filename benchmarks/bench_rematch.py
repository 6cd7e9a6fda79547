"""OTCCLIP's caption re-matching: throughput at growing pool sizes, the time to re-match 1 M pairs, and batched
``rclip.ot`` against POT pair by pair, side by side in one run.

Re-matching a corpus of N pairs gives each image the caption of the corpus at the smallest OT distance among its
k most similar captions (``rclip.methods.otcclip.rematch_corpus``). Beyond encoding (one forward pass per image and
per candidate caption, the cost of an inference epoch), its work per image is

* **top-k** over the pool's N global caption embeddings (``topk_similar``, scanned in chunks): O(N) per image, so
  O(N²) for the corpus;
* **OT** between the image's P patch tokens and each of its k candidates' L word tokens (``candidate_distances``:
  one batched Sinkhorn over all of a chunk's image × candidate problems): O(k · P · L · iterations), independent of N.

For each pool size the script times both on Q query images against a pool of N random unit embeddings (the
features' values do not change the cost), reports re-matching throughput (pairs/s; global matching, i.e. top-k
alone, beside it) and extrapolates the time for all N pairs. Peers run side by side: the top-k scan against
the bare matrix product it cannot avoid (the same Q x N x D similarities into one reused buffer, nothing else: the
roofline of an exact top-k) and against the plain scan (``torch.topk`` of each chunk's fresh product, merged; the
run exits 1 if the two top-k differ), and the OT part in Sinkhorn's kernel domain (what re-matching uses) against
the log domain; 1 M is measured directly when listed in ``--sizes``
(the default on CUDA), else extrapolated linearly in N per image from the largest measured size. The OT part is
compared with POT (``ot.sinkhorn2``, float64 numpy, same ε, tolerance and iteration cap) solving a random subset of
the same problems one by one: both throughputs (problems/s), their ratio and the largest difference in distance.
``--end-to-end N`` also times ``rematch_corpus`` itself, encoding included, on N random pairs with a random-weight
model (``--model``), and prints where its time goes.

    python benchmarks/bench_rematch.py --device cuda --json rematch-cuda.json        # ViT-B/32 sizes, up to 1 M
    python benchmarks/bench_rematch.py --device cpu --threads 1 --json rematch-cpu.json
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from rclip.methods.otcclip import OTConfig, RematchConfig, candidate_distances, token_set, topk_similar

import common  # benchmarks/common.py


def random_sets(n, length, dim, g, device, min_len=1):
    """n token sets of up to ``length`` unit tokens (random real lengths in [min_len, length])."""
    lengths = torch.randint(min_len, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    return token_set(torch.randn(n, length, dim, generator=g), mask).to(device)


def topk_per_chunk(queries, keys, k, chunk):
    """The plain peer of ``topk_similar``: each chunk's similarities in a fresh tensor, ``torch.topk`` of each chunk
    and of the running top-k merged with it (what ``topk_similar`` did before its two-level scan)."""
    best_v = best_i = None
    for c in range(0, len(keys), chunk):
        block = keys[c:c + chunk]
        v, i = (queries @ block.T).topk(min(k, len(block)), dim=1)
        if best_v is not None:
            v, pick = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
            i = torch.cat([best_i, i + c], 1).gather(1, pick)
        else:
            i = i + c
        best_v, best_i = v, i
    return best_v, best_i


def pot_distances(images, words, cand, cfg, n, seed):
    """POT's sinkhorn2 on ``n`` random (image, candidate) problems, one by one: (seconds per problem, pairs, values)."""
    import ot as pot

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, cand.shape[0], n)
    cols = rng.integers(0, cand.shape[1], n)
    x_tok, x_mask = images.tokens.double().cpu().numpy(), images.mask.cpu().numpy()
    y_tok, y_mask = words.tokens.double().cpu().numpy(), words.mask.cpu().numpy()
    problems = []
    for i, j in zip(rows, cols):
        c = int(cand[i, j])
        x, y = x_tok[i][x_mask[i]], y_tok[c][y_mask[c]]
        problems.append((np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), 1 - x @ y.T))
    t0 = time.perf_counter()
    values = [float(pot.sinkhorn2(a, b, m, cfg.reg, method="sinkhorn_log", numItermax=cfg.max_iter,
                                  stopThr=cfg.tol)) for a, b, m in problems]
    return (time.perf_counter() - t0) / n, list(zip(rows.tolist(), cols.tolist())), values


def end_to_end(args, device):
    """rematch_corpus on N random pairs with a random-weight model: total seconds and the encoding share."""
    from rclip import models
    from rclip.data.pairs import PairCorpus
    from rclip.methods.otcclip import rematch_corpus
    from rclip.world.language import caption_scene
    from rclip.world.scenes import sample_scene, scene_rng

    torch.manual_seed(args.seed)
    bundle = models.load(args.model, device=device)
    n, size = args.end_to_end, bundle.image_size
    texts = [caption_scene(sample_scene(r), r).text for r in (scene_rng(args.seed, "bench", i) for i in range(n))]
    corpus = PairCorpus(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(args.seed)), texts)
    cfg = RematchConfig(k=args.k, ot=OTConfig(reg=args.reg, max_iter=args.max_iter, tol=args.tol),
                        batch_size=args.ot_batch)
    total, _, _ = common.timed(lambda: rematch_corpus(bundle, corpus, cfg, image_chunk=args.Q), device, 1)
    glob, _, _ = common.timed(lambda: rematch_corpus(bundle, corpus, RematchConfig(k=args.k, method="global"),
                                                     image_chunk=args.Q), device, 1)
    return {"model": args.model, "pairs": n, "ot_seconds": total, "global_seconds": glob,
            "ot_pairs_per_s": n / total, "global_pairs_per_s": n / glob}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", help="pool sizes N (default cuda: 10k 100k 1M; cpu: 4k 32k 256k)")
    p.add_argument("--k", type=int, default=16, help="candidates per image")
    p.add_argument("--Q", type=int, help="query images per timed chunk (default cuda 4096, cpu 1024 = rematch_corpus's image_chunk)")
    p.add_argument("--patches", type=int, help="patch tokens per image (default cuda 49 = ViT-B/32; cpu 64 = world)")
    p.add_argument("--words", type=int, default=16, help="longest caption, in word tokens (random 4..words)")
    p.add_argument("--dim", type=int, help="joint embedding dim (default cuda 512, cpu 128)")
    p.add_argument("--reg", type=float, default=0.1)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--ot-batch", type=int, default=64, help="images per batched Sinkhorn solve")
    p.add_argument("--chunk", type=int, default=16384, help="pool captions per top-k chunk")
    p.add_argument("--pot-problems", type=int, default=200)
    p.add_argument("--target", type=int, default=1_000_000, help="corpus size to extrapolate to")
    p.add_argument("--end-to-end", type=int, default=0, metavar="N", help="also time rematch_corpus on N pairs")
    p.add_argument("--model", default="rclip-world", help="architecture for --end-to-end (random weights)")
    p.add_argument("--repeat", type=int, default=3)
    common.add_run_options(p)
    args = common.parse(p, argv)
    cpu = args.device == "cpu"
    args.sizes = args.sizes or ([4_000, 32_000, 256_000] if cpu else [10_000, 100_000, 1_000_000])
    args.Q = args.Q or (1024 if cpu else 4096)
    args.patches = args.patches or (64 if cpu else 49)
    args.dim = args.dim or (128 if cpu else 512)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if not cpu else platform.processor() or "cpu"
    cfg = OTConfig(reg=args.reg, max_iter=args.max_iter, tol=args.tol)
    print(f"re-matching on {args.device} ({name}, {torch.get_num_threads()} CPU threads): k={args.k} candidates, "
          f"{args.patches} patches x up to {args.words} words, D={args.dim}, Sinkhorn eps={args.reg}, "
          f"tol={args.tol}, max_iter={args.max_iter}; timed on Q={args.Q} query images per pool size")

    g = torch.Generator().manual_seed(args.seed)
    images = random_sets(args.Q, args.patches, args.dim, g, device, min_len=args.patches)
    n_words = args.Q * args.k                                 # the chunk's candidates (all distinct: worst case)
    words = random_sets(n_words, args.words, args.dim, g, device, min_len=4)
    local = torch.arange(n_words, device=device).reshape(args.Q, args.k)
    ot_s, _, dist = common.timed(lambda: candidate_distances(images, words, local, cfg, batch_size=args.ot_batch),
                                 device, args.repeat)
    log_s, _, dist_log = common.timed(lambda: candidate_distances(images, words, local, cfg, batch_size=args.ot_batch,
                                                                  domain="log"), device, args.repeat)
    print(f"OT of {args.Q} images x {args.k} candidates: kernel domain {ot_s * 1e3:.1f} ms, log domain "
          f"{log_s * 1e3:.1f} ms ({log_s / ot_s:.2f}x); largest difference {float((dist - dist_log).abs().max()):.1e}")
    rows = []
    for n in sorted(args.sizes):
        pool = F.normalize(torch.randn(n, args.dim, generator=g), dim=-1).to(device)
        # as rematch_corpus calls it for each chunk of images: the pool is checked for NaN/inf once per corpus
        topk_s, _, ours = common.timed(lambda: topk_similar(images.pooled, pool, args.k, chunk_size=args.chunk,
                                                            check_keys=False), device, args.repeat)
        out = torch.empty(args.Q, min(args.chunk, n), device=device)
        gemm_s, _, _ = common.timed(lambda: [torch.mm(images.pooled, pool[c:c + args.chunk].T, out=out[:, :len(pool[c:c + args.chunk])])
                                             for c in range(0, n, args.chunk)], device, args.repeat)
        peer_s, _, peer = common.timed(lambda: topk_per_chunk(images.pooled, pool, args.k, args.chunk), device,
                                       args.repeat)
        # the same keys; the values to rounding (the peer multiplies all Q queries at once, ours 256 at a time)
        same = bool(torch.equal(ours[1], peer[1]) and torch.allclose(ours[0], peer[0], rtol=0, atol=1e-5))
        del out
        per_image = (topk_s + ot_s) / args.Q
        rows.append({"pool": n, "topk_seconds": topk_s, "gemm_seconds": gemm_s, "per_chunk_topk_seconds": peer_s,
                     "same_as_per_chunk_topk": same, "ot_seconds": ot_s,
                     "ot_log_seconds": log_s, "ot_pairs_per_s": 1 / per_image, "global_pairs_per_s": args.Q / topk_s,
                     "corpus_seconds": n * per_image})
        print(f"N={n:>9,}: top-k {topk_s * 1e3:8.1f} ms (its matrix product alone {gemm_s * 1e3:8.1f} ms: "
              f"{gemm_s / topk_s:4.0%} of the roofline; torch.topk per chunk {peer_s * 1e3:8.1f} ms: "
              f"{peer_s / topk_s:.2f}x, {'same' if same else 'DIFFERENT'} result) + OT {ot_s * 1e3:8.1f} ms per {args.Q} images -> "
              f"{rows[-1]['ot_pairs_per_s']:10,.0f} pairs/s (global matching alone {rows[-1]['global_pairs_per_s']:10,.0f}"
              f" pairs/s); all {n:,} pairs in {rows[-1]['corpus_seconds']:9.1f} s")
        del pool
    largest = rows[-1]
    if largest["pool"] == args.target:
        target_s, how = largest["corpus_seconds"], "measured"
    else:
        topk_per_image = largest["topk_seconds"] / args.Q * args.target / largest["pool"]
        target_s, how = args.target * (topk_per_image + ot_s / args.Q), "extrapolated (top-k linear in N per image)"
    scale = args.target / largest["pool"] * args.target / args.Q
    floor_s = largest["gemm_seconds"] * scale + args.target * ot_s / args.Q
    print(f"re-matching {args.target:,} pairs (k={args.k}), encoding excluded: {target_s:.1f} s = "
          f"{target_s / 60:.2f} min on {args.device} [{how}]; the exact top-k's matrix products alone would take "
          f"{largest['gemm_seconds'] * scale / 60:.1f} min of it (floor with OT: {floor_s / 60:.1f} min)")

    pot_per, pairs, pot_vals = pot_distances(images, words, local, cfg, args.pot_problems, args.seed)
    ours = dist.cpu()[[i for i, _ in pairs], [j for _, j in pairs]].double().numpy()
    max_diff = float(np.abs(ours - np.array(pot_vals)).max())
    ours_rate, pot_rate = args.Q * args.k / ot_s, 1 / pot_per
    print(f"OT distances: rclip batched {ours_rate:,.0f} problems/s vs POT one by one {pot_rate:,.0f} problems/s "
          f"({args.pot_problems} problems): ratio {ours_rate / pot_rate:.1f}x; largest difference {max_diff:.2e}")
    out = dict(bench="rematch", device=args.device, device_name=name, threads=torch.get_num_threads(), k=args.k,
               Q=args.Q, patches=args.patches, words=args.words, dim=args.dim, reg=args.reg, tol=args.tol,
               max_iter=args.max_iter, sizes=rows, target=args.target, target_seconds=target_s, target_how=how,
               target_floor_seconds=floor_s, ot_kernel_vs_log=log_s / ot_s,
               ours_problems_per_s=ours_rate, pot_problems_per_s=pot_rate, ratio_vs_pot=ours_rate / pot_rate,
               max_abs_diff=max_diff, versions=dict(torch=torch.__version__))
    if args.end_to_end:
        e2e = end_to_end(args, device)
        print(f"end to end (rematch_corpus, {e2e['model']}, random weights, encoding included): {e2e['pairs']:,} "
              f"pairs in {e2e['ot_seconds']:.1f} s = {e2e['ot_pairs_per_s']:,.0f} pairs/s by OT; "
              f"{e2e['global_pairs_per_s']:,.0f} pairs/s by global matching")
        out["end_to_end"] = e2e
    common.write_json(args.json, out)
    return 0 if max_diff < 1e-3 and all(r["same_as_per_chunk_topk"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
