"""What the world-scale engine achieves against what this machine can do: a roofline and every kind of work the
chapters spend their time on, measured in one run.

1. The roofline: dense square matrix products (fp32 and bf16) at large sizes — the most floating-point operations
   per second this device delivers to PyTorch.
2. The shipped world CLIP's image tower: forward, and forward + gradient with respect to the input pixels (what
   every attack step needs).
3. One training step of each kind the chapters run: contrastive pre-training (symmetric InfoNCE, the whole model) and
   TeCoA-style adversarial fine-tuning (an inner PGD on the image tower, then the update).
4. PGD-10 on the zero-shot classifier (images/s), world rendering (images/s) and text encoding (captions/s).

Each line gives a rate, the floating-point operations per item (counted by ``torch.utils.flop_counter``) and the
fraction of the fp32 roofline they reach, all in one process, so the fractions compare like with like. Training
steps run as ``rclip.train.fit`` runs them (bf16 autocast on CUDA, fp32 on the CPU); attacks run in fp32.

    python benchmarks/bench_engine.py --threads 2 --json engine-cpu.json
    python benchmarks/bench_engine.py --device cuda --batch 256
"""
from __future__ import annotations

import argparse
import platform

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
from rclip import models, world, zeroshot
from rclip.attacks.image import pgd
from rclip.methods.robust_finetune import AdvFinetuneConfig, freeze_all_but_image_encoder, tecoa_step
from rclip.train import TrainConfig, contrastive_step, make_optimizer


def autocast(device):
    """The autocast of ``rclip.train.fit``: bf16 on CUDA, none on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


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


def workloads(bundle, batch: int, device, attack_steps: int):
    """name -> (items per call, callable). The callables run the chapters' code paths."""
    task = world.zeroshot_task("colour_shape", split="test", n=batch, resolution=bundle.image_size)
    x, y = (t.to(device) for t in task.tensors())
    clf = zeroshot.zeroshot_classifier(bundle, task)
    pairs = world.WorldPairs(batch, resolution=bundle.image_size)
    pair_batch = pairs.__getitems__(list(range(batch)))
    captions = list(pair_batch["texts"])
    scenes = [pairs.pair(i)[0] for i in range(batch)]

    def forward():
        with torch.no_grad():
            return bundle.model.encode_image(bundle.normalize(x))

    def input_grad():
        xr = x.clone().requires_grad_(True)
        bundle.model.encode_image(bundle.normalize(xr)).float().sum().backward()
        return xr.grad

    pre = bundle.copy()
    pre.model.train()
    pre_opt = make_optimizer(pre.model, TrainConfig(steps=1, lr=1e-5))
    pre_loss = contrastive_step(pre, 0, 1)

    def pretrain_step():
        with autocast(device):
            loss = pre_loss(pre.model, pair_batch)
        pre_opt.zero_grad(set_to_none=True)
        loss.backward()
        pre_opt.step()

    tuned = bundle.copy()
    freeze_all_but_image_encoder(tuned.model)
    weights = zeroshot.class_embeddings(tuned, zeroshot.class_prompts(task))
    cfg = AdvFinetuneConfig("tecoa", attack_steps=attack_steps, train=TrainConfig(steps=1, lr=1e-5))
    tecoa_loss = tecoa_step(tuned, weights, cfg)
    tecoa_opt = make_optimizer(tuned.model, cfg.train)
    labelled = {"images": x.cpu(), "labels": y.cpu(), "index": torch.arange(batch)}

    def tecoa():
        with autocast(device):
            loss = tecoa_loss(tuned.model.visual, labelled)
        tecoa_opt.zero_grad(set_to_none=True)
        loss.backward()
        tecoa_opt.step()

    def tecoa_update_only():          # the step without its inner attack, for counting (autograd.grad inside the
        with autocast(device):   # attack cannot run under the flop counter)
            feats = tuned.model.visual(tuned.normalize(x))
        feats.float().sum().backward()

    def pgd10():
        return pgd(clf, x, y, 4 / 255, steps=10)

    return {
        "image tower forward": (batch, forward, None),
        "forward + input gradient": (batch, input_grad, None),
        "contrastive pre-training step": (batch, pretrain_step, None),
        f"TeCoA step (inner PGD-{attack_steps})": (batch, tecoa,
                                                   lambda: attack_steps * flops_of(input_grad)
                                                   + flops_of(tecoa_update_only)),
        "PGD-10 on the zero-shot classifier": (batch, pgd10, lambda: 10 * flops_of(input_grad)),
        "world rendering": (batch, lambda: world.render(scenes, bundle.image_size), None),
        "text encoding": (len(captions), lambda: bundle.encode_texts(captions), None),
    }


def measure(args, device, roof: dict) -> dict:
    rows = {}
    bundle = models.load("world", device=device)
    for name, (items, fn, count) in workloads(bundle, args.batch, device, args.attack_steps).items():
        t, _, _ = common.timed(fn, device, args.repeat)
        flops = (count() if count is not None else flops_of(fn)) / items
        rate = items / t
        rows[name] = {"items_per_s": rate, "gflop_per_item": flops / 1e9, "gflop_per_s": rate * flops / 1e9,
                      "fraction_of_fp32_roofline": rate * flops / 1e9 / roof["float32"]}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=64, help="images (or pairs, captions) per call")
    p.add_argument("--attack-steps", type=int, default=3, help="inner PGD steps of the TeCoA step")
    p.add_argument("--repeat", type=int, default=3)
    common.add_run_options(p)
    args = common.parse(p, argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    roof = roofline(device, args.repeat)
    print(f"device {device} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"roofline (dense GEMM): fp32 {roof['float32']:.1f} GFLOP/s, bf16 {roof['bfloat16']:.1f} GFLOP/s")
    results = measure(args, device, roof)
    print(f"{'workload':42s} {'items/s':>10s} {'GFLOP/item':>11s} {'GFLOP/s':>9s} {'of fp32 roof':>13s}")
    for name, r in results.items():
        print(f"{name:42s} {r['items_per_s']:10.1f} {r['gflop_per_item']:11.3f} {r['gflop_per_s']:9.1f} "
              f"{r['fraction_of_fp32_roofline']:13.1%}")
    common.write_json(args.json, {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
                                  "roofline_gflop_s": roof, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
