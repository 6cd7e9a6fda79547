"""What the world-scale engine achieves against what this machine can do: a roofline and every kind of work the
chapters spend their time on, each under the plain and the fast engine (:mod:`rclip.engine`), in one run.

1. The roofline: dense square matrix products (fp32 and bf16) at large sizes — the most floating-point operations
   per second this device delivers to PyTorch — and, for the image tower, the roofline *at its own shapes*: the
   matrix products one step performs (recorded as it runs), replayed alone.
2. The shipped world CLIP's image tower: forward, and forward + gradient with respect to the input pixels (one
   attack step, as the attacks take it: ``torch.autograd.grad`` under :func:`rclip.attacks.image.fp32_eval`).
3. One training step of each kind the chapters run, as :func:`rclip.train.fit` runs it
   (:class:`rclip.engine.TrainingForward`): contrastive pre-training (symmetric InfoNCE, the whole model) and
   TeCoA-style adversarial fine-tuning (an inner fp32 PGD on the image tower, then the update).
4. PGD-10 on the zero-shot classifier (images/s), world rendering (images/s) and text encoding (captions/s).

Each workload runs under ``RCLIP_ENGINE=plain`` and ``fast`` on the same inputs; the table gives both rates, their
ratio, the floating-point operations per item (``torch.utils.flop_counter``) and the fraction of the roofline the
fast engine reaches (of the bf16 roofline for training steps that run in bf16). It also checks that both engines'
PGD-10 images are identical.

    python benchmarks/bench_engine.py --threads 2 --json engine-cpu.json
    python benchmarks/bench_engine.py --device cuda --batch 256
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import common
from rclip import engine, models, world, zeroshot
from rclip.attacks.image import fp32_eval, pgd
from rclip.methods.robust_finetune import AdvFinetuneConfig, freeze_all_but_image_encoder, tecoa_step
from rclip.train import TrainConfig, contrastive_step, make_optimizer


def flops_of(fn) -> int:
    """Floating-point operations of one call of ``fn`` (matrix products and convolutions, as torch counts them)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def roofline(device, repeat: int) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in (2048, 4096):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            t, _, _ = common.timed(lambda: a @ b, device, repeat)
            best = max(best, 2 * n ** 3 / t / 1e9)
        out[str(dtype).removeprefix("torch.")] = best
    return out


class _MatmulRecorder(TorchDispatchMode):
    """Records every matrix product (mm, addmm, bmm) a call performs: its operand shapes and dtype."""

    OPS = {"mm", "addmm", "bmm"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
            self.calls.append((tuple(a.shape), tuple(b.shape), a.dtype))
        return func(*args, **(kwargs or {}))


def shape_roofline(fn, device, repeat: int) -> dict:
    """The matrix products one call of ``fn`` performs, replayed alone on fresh operands of the same shapes and
    dtype: their flops and seconds, i.e. the time ``fn`` would take if it did nothing but its matrix products."""
    rec = _MatmulRecorder()
    with rec:
        fn()
    ops = [(torch.randn(sa, device=device, dtype=dt), torch.randn(sb, device=device, dtype=dt))
           for sa, sb, dt in rec.calls]
    flops = sum(2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1) for a, b in ops)

    def replay():
        for a, b in ops:
            torch.bmm(a, b) if a.dim() == 3 else a @ b
    t, _, _ = common.timed(replay, device, repeat)
    return {"matmuls": len(ops), "gflop": flops / 1e9, "seconds": t, "gflop_per_s": flops / t / 1e9}


def workloads(bundle, batch: int, device, attack_steps: int):
    """name -> (items per call, callable, flop count or None). Built under the engine in force (the training
    wrappers read it when made); the callables run the chapters' code paths."""
    task = world.zeroshot_task("colour_shape", split="test", n=batch, resolution=bundle.image_size)
    x, y = (t.to(device) for t in task.tensors())
    clf = zeroshot.zeroshot_classifier(bundle, task)
    pairs = world.WorldPairs(batch, resolution=bundle.image_size)
    pair_batch = pairs.__getitems__(list(range(batch)))
    captions = list(pair_batch["texts"])
    scenes = [pairs.pair(i)[0] for i in range(batch)]

    def forward():
        with torch.no_grad(), fp32_eval(bundle.model):
            return bundle.model.encode_image(bundle.normalize(x))

    def input_grad():
        with fp32_eval(bundle.model):
            xr = x.clone().requires_grad_(True)
            return torch.autograd.grad(bundle.model.encode_image(bundle.normalize(xr)).float().sum(), xr)[0]

    def input_grad_counted():         # the same for the flop counter, which cannot follow autograd.grad: backward
        trainable = [p for p in bundle.model.parameters() if p.requires_grad]   # with the weights frozen, so that
        bundle.model.requires_grad_(False)                                      # it computes what autograd.grad
        try:                                                                    # computes, the pixels' gradient
            with fp32_eval(bundle.model):
                xr = x.clone().requires_grad_(True)
                bundle.model.encode_image(bundle.normalize(xr)).float().sum().backward()
        finally:
            for p in trainable:
                p.requires_grad_(True)

    pre = bundle.copy()
    pre.model.train().requires_grad_(True)
    pre_cfg = TrainConfig(steps=1, lr=1e-5)
    pre_opt = make_optimizer(pre.model, pre_cfg)
    pre_net = engine.TrainingForward(pre.model, device, pre_cfg.amp)
    pre_loss = contrastive_step(pre, 0, 1)

    def pretrain_step():
        loss = pre_loss(pre_net, pair_batch)
        pre_opt.zero_grad(set_to_none=True)
        loss.backward()
        pre_opt.step()

    tuned = bundle.copy()
    freeze_all_but_image_encoder(tuned.model)
    weights = zeroshot.class_embeddings(tuned, zeroshot.class_prompts(task))
    cfg = AdvFinetuneConfig("tecoa", attack_steps=attack_steps, train=TrainConfig(steps=1, lr=1e-5))
    tecoa_loss = tecoa_step(tuned, weights, cfg)
    tecoa_opt = make_optimizer(tuned.model, cfg.train)
    tecoa_net = engine.TrainingForward(tuned.model.visual, device, cfg.train.amp)
    labelled = {"images": x.cpu(), "labels": y.cpu(), "index": torch.arange(batch)}

    def tecoa():
        tuned.model.visual.train()
        loss = tecoa_loss(tecoa_net, labelled)
        tecoa_opt.zero_grad(set_to_none=True)
        loss.backward()
        tecoa_opt.step()

    def tecoa_update_only():          # the step without its inner attack, for counting (autograd.grad inside the
        feats = tecoa_net(tuned.normalize(x))   # attack cannot run under the flop counter)
        feats.float().sum().backward()

    def pgd10():
        return pgd(clf, x, y, 4 / 255, steps=10)

    return {
        "image tower forward": (batch, forward, None),
        "forward + input gradient": (batch, input_grad, lambda: flops_of(input_grad_counted)),
        "contrastive pre-training step": (batch, pretrain_step, None),
        f"TeCoA step (inner PGD-{attack_steps})": (batch, tecoa,
                                                   lambda: attack_steps * flops_of(input_grad_counted)
                                                   + flops_of(tecoa_update_only)),
        "PGD-10 on the zero-shot classifier": (batch, pgd10, lambda: 10 * flops_of(input_grad_counted)),
        "world rendering": (batch, lambda: world.render(scenes, bundle.image_size), None),
        "text encoding": (len(captions), lambda: bundle.encode_texts(captions), None),
    }


BF16_STEPS = ("contrastive pre-training step",)     # a TeCoA step's flops are mostly its inner attack's, in fp32


def alternately(calls: dict, device, repeat: int) -> dict:
    """Median seconds of each callable of ``calls`` ({name: (engine mode, fn)}), timed in turn (a, b, a, b, ...)
    ``repeat`` times after one warm-up round, so that a machine whose speed drifts treats all alike; each call runs
    under its engine."""
    times = {name: [] for name in calls}
    for r in range(repeat + 1):
        for name, (mode, fn) in calls.items():
            with engine.use(mode):
                t, _ = common.clock(fn, device)
            if r:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(args, device, roof: dict) -> tuple[dict, dict]:
    """Every workload under both engines, timed alternately (plain, fast, plain, ...) so that a machine whose speed
    drifts treats both alike: median rates, flops, fractions of the roofline; the GEMM-shape rooflines of the attack
    step (fp32) and of the pre-training step (as each engine runs it); and both engines' PGD-10 images compared."""
    bundle = models.load("world", device=device)
    work, shapes, adv, dtypes = {}, {}, {}, {}
    for mode in ("plain", "fast"):
        with engine.use(mode):
            torch.manual_seed(args.seed)
            work[mode] = workloads(bundle, args.batch, device, args.attack_steps)
            dtypes[mode] = str(engine.training_dtype(device)).removeprefix("torch.")
    rows = {}
    for name, (items, _, count) in work["fast"].items():
        seconds = alternately({m: (m, work[m][name][1]) for m in ("plain", "fast")}, device, args.repeat)
        with engine.use("fast"):
            gflop = (count() if count is not None else flops_of(work["fast"][name][1])) / items / 1e9
        plain, fast = (items / seconds[m] for m in ("plain", "fast"))
        training = name.startswith(("contrastive pre-training step", "TeCoA step"))
        roof_key = "bfloat16" if name in BF16_STEPS and dtypes["fast"] == "bfloat16" else "float32"
        rows[name] = {"items": items, "plain_items_per_s": plain, "fast_items_per_s": fast, "speedup": fast / plain,
                      "gflop_per_item": gflop, "fast_gflop_per_s": fast * gflop, "roofline": roof_key,
                      "fraction_of_roofline": fast * gflop / roof[roof_key],
                      "plain_dtype": dtypes["plain"] if training else "float32",
                      "fast_dtype": dtypes["fast"] if training else "float32"}
    for mode in ("plain", "fast"):
        with engine.use(mode):
            adv[mode] = work[mode]["PGD-10 on the zero-shot classifier"][1]()
            shapes[mode] = {name: shape_roofline(work[mode][name][1], device, args.repeat)
                            for name in ("forward + input gradient", "contrastive pre-training step")}
    extra = {"shape_rooflines": shapes, "pgd10_images_identical": bool(torch.equal(adv["plain"], adv["fast"])),
             "pgd10_max_abs_difference": float((adv["plain"] - adv["fast"]).abs().max())}
    extra["pretraining_ablation"] = pretraining_ablation(bundle, args, device)
    if args.large_batch and device.type == "cpu":
        extra["large_batch_input_gradient"] = large_batch_input_gradient(bundle, args, device)
    if args.compile:
        extra["compiled_input_gradient"] = compiled_input_gradient(bundle, args, device)
    return rows, extra


def pretraining_ablation(bundle, args, device) -> dict:
    """What each part of the fast engine buys the contrastive pre-training step: the fast step, the fast step with
    the default (fused) attention kernel instead of the math one, with AdamW unfused (as the plain engine makes it),
    and the plain step; samples/s, timed alternately."""
    pairs = world.WorldPairs(args.batch, resolution=bundle.image_size)
    batch = pairs.__getitems__(list(range(args.batch)))
    cfg = TrainConfig(steps=1, lr=1e-5)
    variants = {}
    for name, mode, math_attention, fused in (("fast", "fast", True, True),
                                              ("fast, fused attention kernel", "fast", False, True),
                                              ("fast, AdamW unfused", "fast", True, False),
                                              ("plain", "plain", False, False)):
        with engine.use(mode):
            pre = bundle.copy()
            pre.model.train().requires_grad_(True)
            net = engine.TrainingForward(pre.model, device, cfg.amp)
            net.math_attention = math_attention and net.math_attention
            opt = make_optimizer(pre.model, cfg)
            if mode == "fast" and not fused:          # AdamW as the plain engine makes it
                for group in opt.param_groups:
                    group["fused"] = None
            variants[name] = (mode, pre, net, opt, contrastive_step(pre, 0, 1))

    def step(name):
        mode, pre, net, opt, loss_fn = variants[name]
        loss = loss_fn(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = alternately({name: (v[0], lambda name=name: step(name)) for name, v in variants.items()}, device,
                          args.repeat)
    return {name: args.batch / t for name, t in seconds.items()}


def large_batch_input_gradient(bundle, args, device) -> dict:
    """A forward + input gradient through ``CLIPBundle.image_features`` of ``--large-batch`` images (SGA's image
    step: image batch x 5 views) all at once, against the pieces of ``rclip.models.CPU_IMAGE_CHUNK`` it now runs in
    on the CPU; timed alternately, gradients compared."""
    from rclip import models as rmodels

    n = args.large_batch
    task = world.zeroshot_task("colour_shape", split="test", n=n, resolution=bundle.image_size)
    x = task.tensors()[0].to(device)
    w = torch.nn.functional.normalize(torch.randn(n, bundle.model.text_projection.shape[1],
                                                  generator=torch.Generator().manual_seed(args.seed)), dim=-1)
    chunk = rmodels.CPU_IMAGE_CHUNK

    def step(pieces: int):
        rmodels.CPU_IMAGE_CHUNK = pieces
        try:
            with fp32_eval(bundle.model):
                xr = x.clone().requires_grad_(True)
                return torch.autograd.grad(-(bundle.image_features(xr).float() * w).sum(), xr)[0]
        finally:
            rmodels.CPU_IMAGE_CHUNK = chunk
    seconds = alternately({"at once": (engine.mode(), lambda: step(n)),
                           "in pieces": (engine.mode(), lambda: step(chunk))}, device, args.repeat)
    once, pieces = (n / seconds[k] for k in ("at once", "in pieces"))
    return {"images": n, "chunk": chunk, "at_once_items_per_s": once, "in_pieces_items_per_s": pieces,
            "speedup": pieces / once, "identical_gradients": bool(torch.equal(step(n), step(chunk)))}


def compiled_input_gradient(bundle, args, device) -> dict:
    """What ``torch.compile`` of the image tower buys the attack step (fp32): its compile time and the rate against
    the eager step, timed alternately; the gradients compared."""
    x = world.zeroshot_task("colour_shape", split="test", n=args.batch, resolution=bundle.image_size).tensors()[0]
    x = x.to(device)
    eager_tower = bundle.model.visual
    compiled_tower = torch.compile(eager_tower)

    def step(tower):
        with fp32_eval(bundle.model):
            xr = x.clone().requires_grad_(True)
            return torch.autograd.grad(tower(bundle.normalize(xr)).float().sum(), xr)[0]
    compile_s, g_compiled = common.clock(lambda: step(compiled_tower), device)
    g_eager = step(eager_tower)
    seconds = alternately({"eager": (engine.mode(), lambda: step(eager_tower)),
                           "compiled": (engine.mode(), lambda: step(compiled_tower))}, device, args.repeat)
    eager, compiled = (args.batch / seconds[k] for k in ("eager", "compiled"))
    return {"compile_s": compile_s, "eager_items_per_s": eager, "compiled_items_per_s": compiled,
            "speedup": compiled / eager, "max_abs_gradient_difference": float((g_eager - g_compiled).abs().max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=64, help="images (or pairs, captions) per call")
    p.add_argument("--attack-steps", type=int, default=3, help="inner PGD steps of the TeCoA step")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per engine and workload (alternating)")
    p.add_argument("--large-batch", type=int, default=1280,
                   help="images for the at-once vs in-pieces input-gradient comparison on the CPU (0: skip)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile measurement of the attack step (about 30 s of compilation)")
    common.add_run_options(p)
    args = common.parse(p, argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    roof = roofline(device, args.repeat)
    print(f"device {device} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, batch {args.batch}")
    print(f"roofline (dense GEMM): fp32 {roof['float32']:.1f} GFLOP/s, bf16 {roof['bfloat16']:.1f} GFLOP/s")
    results, extra = measure(args, device, roof)
    print(f"{'workload':38s} {'plain/s':>9s} {'fast/s':>9s} {'fast÷plain':>10s} {'GFLOP/item':>10s} "
          f"{'GFLOP/s':>8s} {'of roofline':>16s}")
    for name, r in results.items():
        print(f"{name:38s} {r['plain_items_per_s']:9.1f} {r['fast_items_per_s']:9.1f} {r['speedup']:9.2f}x "
              f"{r['gflop_per_item']:10.3f} {r['fast_gflop_per_s']:8.1f} {r['fraction_of_roofline']:9.1%} "
              f"{'(' + r['roofline'][:4] + ')':>6s}")
    for mode, found in extra["shape_rooflines"].items():
        for name, sr in found.items():
            print(f"{mode:5s} {name}: its {sr['matmuls']} matrix products alone, replayed at their shapes: "
                  f"{sr['gflop_per_s']:.1f} GFLOP/s, {sr['seconds'] * 1e3:.1f} ms per call")
    ab = extra["pretraining_ablation"]
    print("contrastive pre-training step, samples/s: " + ", ".join(f"{k} {v:.1f}" for k, v in ab.items()))
    if "large_batch_input_gradient" in extra:
        lb = extra["large_batch_input_gradient"]
        print(f"forward + input gradient of {lb['images']} images: at once {lb['at_once_items_per_s']:.1f}, in pieces "
              f"of {lb['chunk']} {lb['in_pieces_items_per_s']:.1f} images/s ({lb['speedup']:.2f}x); gradients "
              f"{'identical' if lb['identical_gradients'] else 'DIFFER'}")
    if "compiled_input_gradient" in extra:
        c = extra["compiled_input_gradient"]
        print(f"torch.compile of the image tower, forward + input gradient (fp32): {c['compiled_items_per_s']:.1f} vs "
              f"{c['eager_items_per_s']:.1f} images/s eager ({c['speedup']:.2f}x) after {c['compile_s']:.1f} s of "
              f"compilation; gradients differ by at most {c['max_abs_gradient_difference']:.1e}")
    print(f"PGD-10 images, plain vs fast engine: {'identical' if extra['pgd10_images_identical'] else 'DIFFER'} "
          f"(largest difference {extra['pgd10_max_abs_difference']:.2e})")
    common.write_json(args.json, {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
                                  "roofline_gflop_s": roof, "results": results, **extra})
    return 0 if extra["pgd10_images_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
