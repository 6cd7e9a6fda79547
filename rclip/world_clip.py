"""Pre-train the world CLIP and write it, with its log, as the file the package ships.

``rclip world-clip train --profile gpu`` is the one command that produces ``rclip/assets/world_clip/``:

* ``model.safetensors`` - fp16 weights, with the open_clip config and metadata inside;
* ``train_log.json`` - the settings, the exact command, device, library versions, per-step loss and the
  validation curves (zero-shot top-1 per task, retrieval R@K) measured during training;
* ``SHA256SUMS`` - the checksum of the weights, to compare a retrained model against.

Training resumes from ``$RCLIP_CACHE/world_clip_runs/<key>/`` after an interruption (the key hashes the settings).
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

from rclip import models, retrieval, zeroshot
from rclip.cache import artefact_path, write_json
from rclip.train import TrainConfig, init_distributed, pretrain
from rclip.world.tasks import TASK_NAMES, WorldPairs, retrieval_set, zeroshot_task

DEFAULTS = dict(model="rclip-world", resolution=64, seed=0, steps=4000, batch_size=256, lr=1e-3, min_lr=1e-5,
                warmup_steps=200, weight_decay=0.1, eval_every=250, eval_n=200, num_workers=0, ckpt_every=250)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from rclip.errors import RClipError

        raise RClipError(f"device {device!r} was asked for but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(device)


def validation_suite(resolution: int, n: int, seed: int):
    """Small val-split tasks and a retrieval set, rendered once; returns an ``evaluate(bundle) -> dict``."""
    tasks = {name: zeroshot_task(name, split="val", n=n, resolution=resolution, seed=seed) for name in TASK_NAMES}
    rset = retrieval_set(split="val", n=n, resolution=resolution, seed=seed)

    def evaluate(bundle: models.CLIPBundle) -> dict:
        out = {f"top1/{name}": round(zeroshot.evaluate(bundle, t)["templates"], 2) for name, t in tasks.items()}
        out["top1/mean"] = round(sum(out.values()) / len(out), 2)
        r = retrieval.evaluate(bundle, rset)
        out.update({k: round(v, 2) for k, v in r.items() if k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")})
        return out

    return evaluate


def train_world_clip(settings: dict, *, device: str = "auto", assets_dir: str | Path | None = None,
                     run_dir: str | Path | None = None, command: str = "", progress: bool = True,
                     max_minutes: float | None = None, rank_weights_dir: str | Path | None = None) -> dict:
    """Train the world CLIP with ``settings`` (see :data:`DEFAULTS`) and write it to ``assets_dir``."""
    s = {**DEFAULTS, **settings}
    rank, world = init_distributed()
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(s["seed"])
    bundle = models.load(s["model"], device=dev)
    if bundle.image_size != s["resolution"]:
        from rclip.errors import RClipError

        raise RClipError(f"{s['model']} takes {bundle.image_size} px images but the settings ask for "
                         f"resolution {s['resolution']}; make them agree")
    data = WorldPairs(max(s["steps"], 1) * s["batch_size"], split="train", resolution=s["resolution"],
                      seed=s["seed"])
    cfg = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], min_lr=s["min_lr"],
                      warmup_steps=s["warmup_steps"], weight_decay=s["weight_decay"], seed=s["seed"],
                      eval_every=s["eval_every"], ckpt_every=s["ckpt_every"], num_workers=s["num_workers"],
                      max_minutes=max_minutes)
    key_params = {k: v for k, v in s.items() if k not in ("eval_every", "eval_n", "num_workers", "ckpt_every")}
    run = Path(run_dir) if run_dir else artefact_path("world_clip_runs", {**key_params, "world": world,
                                                                         "device": dev.type})
    evaluate = validation_suite(s["resolution"], s["eval_n"], s["seed"]) if (rank == 0 and s["eval_every"]) else None
    log = pretrain(bundle, data, cfg, run, evaluate=evaluate, progress=progress)

    if rank_weights_dir is not None:
        models.save(bundle, Path(rank_weights_dir) / f"rank{rank}.safetensors")
    if rank != 0 or assets_dir is None:
        return log
    assets = Path(assets_dir)
    bundle.meta.update(name="world", source="world")
    digest = models.save(bundle, assets / "model.safetensors", dtype=torch.float16,
                         extra={"settings": s, "steps_done": log.get("last_step")})
    (assets / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n", encoding="utf-8")
    full = {
        **log,
        "settings": s,
        "command": command or " ".join(sys.argv),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "model_sha256": digest,
        "samples_seen": int(log.get("last_step", 0)) * s["batch_size"],
    }
    write_json(assets / "train_log.json", full)
    return full


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "open_clip_torch", "pot", "numpy", "rclip"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
