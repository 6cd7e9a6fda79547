"""SGA evaluation of a retrieval gallery with the world CLIP, and what batching buys, side by side in one run.

* **SGA end to end**: ``rclip.attacks.evaluate_attacks(bundle, gallery, ["sga"])`` on N images x 5N captions (the
  text attack guided by the clean images, the image attack over 5 rescaled views x ``--steps`` steps, the text
  attack again guided by the adversarial images, then R@K over the whole gallery). Printed as seconds and
  extrapolated linearly to 1 000 images x 5 000 captions (the paper's Flickr30k 1K test set) when N is smaller;
  the extrapolation is labelled as such.
* **The lean image forward** (``CLIPBundle.attack_features``: patches as one matrix product, one attention call per
  block, the last block for the class token only) against open_clip's ``encode_image``, which the image steps ran
  before: SGA end to end with each (same seed; the recalls should agree), and the forward + input gradient of five
  copies of one image batch (SGA's count of views) alone, with the largest differences in embeddings and gradients.
* **What SGA no longer repeats**, each against the path it replaced, on the same inputs: its resizes as 1-D
  resampling matrix products against ``F.interpolate`` (forward + input gradient of the four rescaled views), and its
  second guided text pass with the first pass's memo of encoded texts against the same pass on its own (the
  captions must be identical).
* **Batched vs one at a time** on the same inputs:
  - the text attack: all masked variants and all substitutes of all captions in batched forwards, against calling
    it caption by caption (the results must be identical);
  - the text encoder: captions cut to the batch's longest caption (``trimmed_text_features``) against open_clip's
    full-context ``encode_text``;
  - SGA's image step: every image of the gallery in one batch against one image at a time.

    python benchmarks/bench_sga.py --device cuda --json sga-cuda.json           # N = 1000 (5 000 captions)
    python benchmarks/bench_sga.py --device cpu --n 50 --threads 2 --json sga-cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
from dataclasses import replace

import torch

from rclip import models, world
from rclip.attacks import RetrievalAttackConfig, TextAttackConfig, evaluate_attacks, text_attack
from rclip.attacks.image import fp32_eval
from rclip.attacks.multimodal import _bicubic, _similarity_descent
from rclip.attacks.text import _embed, rank_words, trimmed_text_features

import common  # benchmarks/common.py


@contextlib.contextmanager
def open_clip_forward():
    """The retrieval attacks' image steps through open_clip's ``encode_image`` (what they ran before the lean
    forward): ``CLIPBundle.attack_features`` takes its fallback, in the same CPU pieces."""
    covers = models.lean_forward_covers
    models.lean_forward_covers = lambda visual: False
    try:
        yield
    finally:
        models.lean_forward_covers = covers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, help="gallery images (5 captions each); default 1000 on cuda, 50 on cpu")
    p.add_argument("--steps", type=int, default=10, help="SGA image steps (the reference's 10)")
    p.add_argument("--eps", type=float, default=2.0, help="x 1/255")
    p.add_argument("--source", default="lexicon", help="substitute source (lexicon | synonyms)")
    p.add_argument("--loop-captions", type=int, default=20, help="captions attacked one at a time (ratio (a))")
    p.add_argument("--loop-images", type=int, default=8, help="images attacked one at a time (ratio (c))")
    p.add_argument("--image-batch", type=int, default=256)
    common.add_run_options(p)
    args = common.parse(p, argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    n = args.n or (1000 if device.type == "cuda" else 50)

    bundle = models.load("world", device=device)
    gallery = world.retrieval_set(split="test", n=n, seed=args.seed)
    cfg = RetrievalAttackConfig(eps=args.eps / 255, steps=args.steps, seed=args.seed, image_batch=args.image_batch,
                                text=TextAttackConfig(source=args.source))
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "n_images": n, "n_captions": len(gallery.captions), "steps": args.steps, "eps_255": args.eps,
           "source": args.source}

    # SGA end to end (one warm-up on a tiny gallery first)
    evaluate_attacks(bundle, world.retrieval_set(split="test", n=2, seed=args.seed), ["sga"], cfg)
    sga_s, res = common.clock(lambda: evaluate_attacks(bundle, gallery, ["sga"], cfg, ks=(1, 5)), device)
    out.update(sga_s=round(sga_s, 2), sga_recall={k: round(v, 2) for k, v in res["sga"].recall.items()})
    out["sga_s_per_1000_images"] = round(sga_s * 1000 / n, 1)
    out["sga_1000_extrapolated"] = n != 1000
    with open_clip_forward():
        old_s, old = common.clock(lambda: evaluate_attacks(bundle, gallery, ["sga"], cfg, ks=(1, 5)), device)
    out["lean_forward"] = {"sga_open_clip_forward_s": round(old_s, 2), "sga_speedup": round(old_s / sga_s, 2),
                           "sga_open_clip_forward_recall": {k: round(v, 2) for k, v in old["sga"].recall.items()}}

    # (a) batched text attack vs one caption at a time
    caps = gallery.captions[:args.loop_captions]
    tcfg = TextAttackConfig(source=args.source)
    bundle.model.eval()
    batched_s, batched = common.clock(lambda: text_attack(bundle, gallery.captions, tcfg), device)
    loop_s, looped = common.clock(lambda: [text_attack(bundle, [c], tcfg)[0] for c in caps], device)
    out["text_attack"] = {"batched_captions_per_s": round(len(gallery.captions) / batched_s, 1),
                          "looped_captions_per_s": round(len(caps) / loop_s, 1),
                          "speedup": round((len(gallery.captions) / batched_s) / (len(caps) / loop_s), 1),
                          "identical": looped == batched[:len(caps)]}

    # (b) trimmed text encoder vs open_clip's full-context encode_text
    texts = gallery.captions * max(1, 2000 // len(gallery.captions))
    with torch.no_grad():
        full_s, _ = common.clock(lambda: [bundle.text_features(bundle.tokenizer(texts[i:i + 512]).to(device))
                                   for i in range(0, len(texts), 512)], device)
        trim_s, _ = common.clock(lambda: _embed(bundle, texts, 512), device)
        tok = bundle.tokenizer(texts[:256]).to(device)
        err = float((trimmed_text_features(bundle, tok) - bundle.text_features(tok)).abs().max())
    out["text_encoder"] = {"full_texts_per_s": round(len(texts) / full_s, 1),
                           "trimmed_texts_per_s": round(len(texts) / trim_s, 1),
                           "speedup": round(full_s / trim_s, 2), "max_abs_diff": err}

    # (c) SGA's image step: the gallery in one batch vs one image at a time
    images = gallery.image_tensor().to(device)
    targets = torch.nn.functional.normalize(torch.randn(n, bundle.meta["embed_dim"],
                                                        generator=torch.Generator().manual_seed(0)), dim=-1)
    k = min(args.loop_images, n)
    gen = torch.Generator().manual_seed(args.seed)
    batch_s, _ = common.clock(lambda: _similarity_descent(bundle, images, targets, cfg, "sga", True, gen), device)
    one = replace(cfg, image_batch=1)
    single_s, _ = common.clock(lambda: _similarity_descent(bundle, images[:k], targets[:k], one, "sga", True, gen), device)
    out["image_step"] = {"batched_images_per_s": round(n / batch_s, 2), "single_images_per_s": round(k / single_s, 2),
                         "speedup": round((n / batch_s) / (k / single_s), 1)}

    # (d) SGA's resizes as matrix products vs F.interpolate: forward + input gradient of the four rescaled views
    x = images[:min(n, args.image_batch)]
    sizes = [(max(1, int(r * x.shape[-2])), max(1, int(r * x.shape[-1]))) for r in cfg.scales]

    def views(resize):
        a = x.clone().requires_grad_(True)
        out = [resize(resize(a, s, r < 1).clamp(0, 1), tuple(x.shape[-2:]), False) for r, s in zip(cfg.scales, sizes)]
        return torch.autograd.grad(sum(v.square().sum() for v in out), a)[0], [v.detach() for v in out]

    interp = lambda a, s, aa: torch.nn.functional.interpolate(a, size=s, mode="bicubic", align_corners=False,  # noqa
                                                              antialias=aa)
    (mat_s, _, (g_mat, v_mat)), (int_s, _, (g_int, v_int)) = (common.timed(lambda f=f: views(f), device, 3)
                                                              for f in (_bicubic, interp))
    out["resize"] = {"images": len(x), "matrix_s": round(mat_s, 3), "interpolate_s": round(int_s, 3),
                     "speedup": round(int_s / mat_s, 2),
                     "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(v_mat, v_int)),
                     "grad_max_abs_diff": float((g_mat - g_int).abs().max())}

    # (e) SGA's second guided text pass with the first pass's memo of encoded texts vs on its own
    guided = TextAttackConfig(source=args.source, criterion="guide")
    ranked = rank_words(bundle, gallery.captions, guided)
    g1, g2 = (torch.nn.functional.normalize(torch.randn(len(gallery.captions), bundle.meta["embed_dim"],
                                                        generator=torch.Generator().manual_seed(s)), dim=-1)
              for s in (1, 2))
    memo = {}
    text_attack(bundle, gallery.captions, guided, guide=g1, ranked=ranked, memo=memo)
    shared_s, shared = common.clock(lambda: text_attack(bundle, gallery.captions, guided, guide=g2, ranked=ranked,
                                                        memo=dict(memo)), device)
    alone_s, alone = common.clock(lambda: text_attack(bundle, gallery.captions, guided, guide=g2, ranked=ranked),
                                  device)
    out["text_memo"] = {"second_pass_shared_s": round(shared_s, 2), "second_pass_alone_s": round(alone_s, 2),
                        "speedup": round(alone_s / shared_s, 2), "identical": shared == alone}

    # (f) the lean image forward vs open_clip's: forward + input gradient of five copies of one image batch
    xv = torch.cat([x] * (1 + len(cfg.scales)))
    w = torch.randn(len(xv), bundle.meta["embed_dim"], generator=torch.Generator().manual_seed(3), device=device)

    def step(forward):
        a = xv.clone().requires_grad_(True)
        f = forward(a)
        return f.detach(), torch.autograd.grad((f * w).sum(), a)[0]

    with fp32_eval(bundle.model):
        lean_s, _, (f_lean, g_lean) = common.timed(lambda: step(bundle.attack_features), device, 3)
        with open_clip_forward():
            oc_s, _, (f_oc, g_oc) = common.timed(lambda: step(bundle.attack_features), device, 3)
    out["lean_forward"].update(views=len(xv), lean_s=round(lean_s, 3), open_clip_s=round(oc_s, 3),
                               speedup=round(oc_s / lean_s, 2), max_abs_diff=float((f_lean - f_oc).abs().max()),
                               grad_max_abs_diff=float((g_lean - g_oc).abs().max()),
                               grad_max_abs=float(g_oc.abs().max()))

    extra = " (extrapolated from N = %d)" % n if n != 1000 else ""
    print(f"device {out['device_name']} ({out['threads']} threads), world CLIP, SGA eps {args.eps:g}/255, "
          f"{args.steps} steps, {args.source} substitutes")
    print(f"SGA evaluation, {n} images x {len(gallery.captions)} captions: {sga_s:.1f} s; "
          f"per 1000 images x 5000 captions: {out['sga_s_per_1000_images']:.0f} s{extra}")
    print(f"  R@1 TR / IR under SGA: {res['sga'].recall['i2t_R@1']:.1f} / {res['sga'].recall['t2i_R@1']:.1f}")
    lf = out["lean_forward"]
    print(f"  with open_clip's image forward instead of the lean one: {lf['sga_open_clip_forward_s']:.1f} s -> "
          f"{lf['sga_speedup']}x (R@1 TR / IR {lf['sga_open_clip_forward_recall']['i2t_R@1']:.1f} / "
          f"{lf['sga_open_clip_forward_recall']['t2i_R@1']:.1f})")
    print(f"lean image forward (forward + input gradient, {lf['views']} images): {lf['lean_s']} s vs open_clip's "
          f"{lf['open_clip_s']} s -> {lf['speedup']}x (max |diff| {lf['max_abs_diff']:.1e}, gradient "
          f"{lf['grad_max_abs_diff']:.1e} of at most {lf['grad_max_abs']:.1e})")
    ta, te, im = out["text_attack"], out["text_encoder"], out["image_step"]
    print(f"text attack: batched {ta['batched_captions_per_s']} captions/s vs one at a time "
          f"{ta['looped_captions_per_s']} -> {ta['speedup']}x (identical: {ta['identical']})")
    print(f"text encoder: trimmed {te['trimmed_texts_per_s']} texts/s vs full context {te['full_texts_per_s']} -> "
          f"{te['speedup']}x (max |diff| {te['max_abs_diff']:.1e})")
    print(f"SGA image step: batched {im['batched_images_per_s']} images/s vs one at a time "
          f"{im['single_images_per_s']} -> {im['speedup']}x")
    rz, tm = out["resize"], out["text_memo"]
    print(f"SGA's resizes (forward + input gradient, {rz['images']} images x 4 views): matrix products "
          f"{rz['matrix_s']} s vs interpolate {rz['interpolate_s']} s -> {rz['speedup']}x (max |diff| "
          f"{rz['max_abs_diff']:.1e}, gradient {rz['grad_max_abs_diff']:.1e})")
    print(f"SGA's second text pass: with the first pass's memo {tm['second_pass_shared_s']} s vs on its own "
          f"{tm['second_pass_alone_s']} s -> {tm['speedup']}x (identical: {tm['identical']})")
    common.write_json(args.json, out)
    return 0 if ta["identical"] and tm["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
