"""Contrastive pre-training of a CLIP bundle: symmetric InfoNCE with a learnable temperature.

* Data: any map-style dataset of image-caption pairs. A dataset with ``__getitems__(indices) -> {"images",
  "texts"}`` (e.g. :class:`rclip.world.WorldPairs`) builds whole batches at once; otherwise items are
  ``(image (3, H, W) in [0, 1], caption str)``. Which samples form step ``t``'s batch is a pure function of
  ``(seed, t)`` (:class:`StepBatchSampler`), so a resumed run sees exactly the data an uninterrupted one would.
* Data parallel: launched by ``torchrun``, each rank takes its slice of the global batch, the model is wrapped in
  ``DistributedDataParallel`` and every rank's loss sees all ranks' features (gathered with gradient), so N
  processes compute the same update as one process with the whole batch (exactly in fp32; under bf16 autocast up
  to the rounding of a smaller batch).
* Mixed precision: bfloat16 autocast on CUDA (no loss scaling needed), and on the CPU under the fast engine
  (:mod:`rclip.engine`; ``RCLIP_ENGINE=plain`` trains in fp32 there). Losses are computed in fp32.
* Checkpoints: every ``ckpt_every`` steps into ``out_dir/ckpt-<step>/``, announced by rewriting
  ``out_dir/latest.json`` last; resume verifies the model file's sha256 before trusting it.
* Hooks (:class:`TrainHooks`): a method whose data change between epochs (caption re-matching, a memory bank, a
  safe/risky split) runs its work in ``before_step`` and keeps its state in ``state_dict``, which is written into
  every checkpoint with the optimizer and restored on resume, so an interrupted run continues as it would have.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from rclip import engine
from rclip.cache import atomic_path, write_json
from rclip.errors import RClipError
from rclip.models import CLIPBundle, read_state_dict, sha256


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is the global batch (split across ranks)."""

    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    amp: bool = True
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    eval_every: int = 0
    num_workers: int = 0
    max_minutes: float | None = None
    extra: dict = field(default_factory=dict)
    optimizer: str = "adamw"          # "adamw" (betas, eps) or "sgd" (momentum; MA²T's recipe)
    momentum: float = 0.9

    def __post_init__(self):
        for name in ("batch_size", "log_every", "ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise RClipError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup_steps < 0 or self.eval_every < 0:
            raise RClipError(f"TrainConfig steps / warmup_steps / eval_every must be >= 0, got {self.steps} / "
                             f"{self.warmup_steps} / {self.eval_every}")
        if not self.lr > 0 or self.min_lr < 0:
            raise RClipError(f"TrainConfig needs lr > 0 and min_lr >= 0, got lr {self.lr}, min_lr {self.min_lr}")


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int]:
    """Initialise ``torch.distributed`` from torchrun's environment if present. Returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_with_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     rank: int = 0, world: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.

    Args:
        image_features, text_features: (B, D) unit-norm features of this rank's pairs.
        logit_scale: scalar, the inverse temperature (already exponentiated).
    Returns: this rank's mean loss; the mean over ranks is the global-batch loss (DDP averages the gradients).
    """
    all_img = _gather_with_grad(image_features, world)
    all_txt = _gather_with_grad(text_features, world)
    b = image_features.shape[0]
    labels = torch.arange(b, device=image_features.device) + rank * b
    logits_i = logit_scale * image_features @ all_txt.T
    logits_t = logit_scale * text_features @ all_img.T
    return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

class StepBatchSampler(Sampler[list[int]]):
    """Index lists for steps ``start .. steps-1`` of this rank.

    Each epoch is a permutation drawn from ``(seed, epoch)``; global batches are consecutive slices of it (the
    tail that does not fill a batch is dropped) and rank ``r`` takes the ``r``-th local slice. Datasets larger than
    10 M items are read in order (their items are i.i.d. by construction, and a permutation would not fit).
    """

    def __init__(self, n: int, global_batch: int, steps: int, *, start: int = 0, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if global_batch % world:
            raise RClipError(f"batch size {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise RClipError(f"the dataset has {n} pairs, fewer than one batch of {global_batch}")
        self.n, self.gb, self.steps, self.start = n, global_batch, steps, start
        self.rank, self.world, self.seed = rank, world, seed
        self.per_epoch = n // global_batch
        self.local = global_batch // world

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def _epoch_order(self, epoch: int) -> torch.Tensor | None:
        if self.n > 10_000_000:
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, None
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            lo = k * self.gb + self.rank * self.local
            if order is None:
                base = e * self.per_epoch * self.gb
                yield list(range(base + lo, base + lo + self.local))
            else:
                yield order[lo:lo + self.local].tolist()


def _collate(items):
    if isinstance(items, dict):  # a batch built by the dataset's __getitems__
        return items
    images, texts = zip(*items)
    return {"images": torch.stack(list(images)), "texts": list(texts)}


class TrainHooks:
    """Per-run extras of :func:`fit`; override what a method needs (the defaults do nothing).

    ``before_step(step)`` runs before step ``step``'s loss (after its batch is drawn), on every rank;
    ``lr_scale(step)`` multiplies that step's scheduled learning rate; ``state_dict()`` is saved in every checkpoint
    (tensors, numbers, strings, lists and dicts of them) and ``load_state_dict`` gets it back on resume.
    """

    def before_step(self, step: int) -> None:
        pass

    def lr_scale(self, step: int) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def _save_checkpoint(out: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, log: dict,
                     hooks: TrainHooks | None = None) -> None:
    from safetensors.torch import save_file

    d = out / f"ckpt-{step}"
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_path(d / "optim.pt") as tmp:
        torch.save({"optimizer": opt.state_dict(), "step": step,
                    **({"hooks": hooks.state_dict()} if hooks is not None else {})}, tmp)
    write_json(d / "log.json", log)
    write_json(out / "latest.json", {"step": step, "dir": d.name, "model_sha256": sha256(d / "model.safetensors")})
    for old in out.glob("ckpt-*"):
        if old != d and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     hooks: TrainHooks | None = None) -> tuple[int, dict] | None:
    latest = out / "latest.json"
    if not latest.is_file():
        return None
    info = json.loads(latest.read_text())
    d = out / info["dir"]
    if not (d / "model.safetensors").is_file() or sha256(d / "model.safetensors") != info["model_sha256"]:
        raise RClipError(f"checkpoint {d} does not match {latest} (interrupted write?). Delete {out} to restart.")
    state, _ = read_state_dict(d / "model.safetensors")
    model.load_state_dict(state, strict=True)
    try:
        blob = torch.load(d / "optim.pt", map_location="cpu", weights_only=True)
    except Exception as exc:          # truncated or foreign file: never fall back to unpickling it
        raise RClipError(f"checkpoint {d / 'optim.pt'} cannot be read ({type(exc).__name__}). Delete {out} to "
                         f"restart the run.") from None
    opt.load_state_dict(blob["optimizer"])
    if hooks is not None:
        if "hooks" not in blob:
            raise RClipError(f"checkpoint {d} was written without the method's state (its hooks); it belongs to "
                             f"another kind of run. Delete {out} to restart.")
        hooks.load_state_dict(blob["hooks"])
    return int(info["step"]), json.loads((d / "log.json").read_text())


def _check_resume(out: Path, saved: dict, wanted: dict, step: int) -> None:
    """Refuse to resume a run whose checkpoint was made with other settings: every field that changes the weights
    must agree (bookkeeping such as ``log_every`` may change), and the checkpoint must not be past the steps asked
    for."""
    from rclip.cache import BOOKKEEPING, cache_key

    if step > wanted["steps"]:
        raise RClipError(f"the checkpoint in {out} is at step {step}, past the {wanted['steps']} steps asked for; "
                         f"delete {out} to train a shorter run")
    a, b = cache_key(saved), cache_key(wanted)
    changed = sorted(k for k in set(a) | set(b) if k not in BOOKKEEPING and a.get(k) != b.get(k))
    if changed:
        raise RClipError(f"the checkpoint in {out} was trained with other settings ("
                         + ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in changed)
                         + f"); delete {out} to train with the new settings, or ask for the old ones")


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name or "embedding" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default) or SGD with momentum over the trainable parameters, weight decay off for gains and biases.
    Under the fast engine (:mod:`rclip.engine`) AdamW is PyTorch's fused kernel (the same update, one pass)."""
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=engine.fast() or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise RClipError(f"unknown optimizer {cfg.optimizer!r}; choose 'adamw' or 'sgd'")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


def contrastive_step(bundle: CLIPBundle, rank: int, world: int) -> LossFn:
    """The pre-training loss of one batch ``{"images": (B, 3, S, S) in [0, 1], "texts": [B str]}``: symmetric
    InfoNCE with the model's learnable temperature, gathered over ranks."""
    def loss_fn(train_model: torch.nn.Module, batch: dict) -> torch.Tensor:
        device = bundle.device
        images = batch["images"].to(device, non_blocking=True)
        tokens = bundle.tokenizer(batch["texts"]).to(device, non_blocking=True)
        img_f, txt_f, scale = train_model(bundle.normalize(images), tokens)[:3]  # fp32 outputs (see fit)
        return contrastive_loss(img_f.float(), txt_f.float(), scale.float(), rank, world)
    return loss_fn


def pretrain(bundle: CLIPBundle, dataset: Dataset, cfg: TrainConfig, out_dir: str | Path, *,
             evaluate: Callable[[CLIPBundle], dict] | None = None, progress: bool = True) -> dict:
    """Contrastively train ``bundle.model`` in place on image-caption pairs (see :func:`fit`)."""
    rank, world = init_distributed()
    return fit(bundle, dataset, cfg, out_dir, contrastive_step(bundle, rank, world), evaluate=evaluate,
               progress=progress, desc="pre-training")


def fit(bundle: CLIPBundle, dataset: Dataset, cfg: TrainConfig, out_dir: str | Path, loss_fn: LossFn, *,
        module: torch.nn.Module | None = None, evaluate: Callable[[CLIPBundle], dict] | None = None,
        progress: bool = True, desc: str = "training", hooks: TrainHooks | None = None) -> dict:
    """Train the parameters of ``bundle.model`` that require grad, in place, minimising ``loss_fn(net, batch)``
    over batches of ``dataset``; resume from ``out_dir`` if it holds a checkpoint (of the whole model).

    ``net`` is ``module`` (a submodule of ``bundle.model`` that the loss calls, e.g. ``model.visual``; default the
    whole model), wrapped in DDP under ``torchrun``: the loss must run its trainable forward through ``net`` so
    gradients are synchronised. ``net``'s forward runs as :class:`rclip.engine.TrainingForward` runs it (bf16
    autocast on CUDA, and on the CPU under the fast engine; outputs in fp32, so losses are fp32). ``hooks``
    (:class:`TrainHooks`) run before every step, scale its learning rate, and have their state checkpointed and
    resumed with the model.

    Returns the training log: config, per-step records (loss, lr, logit scale, samples, seconds) and evaluations.
    """
    rank, world = init_distributed()
    out = Path(out_dir)
    device = bundle.device
    model = bundle.model
    model.train()
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)

    log = {"config": asdict(cfg), "world_size": world, "device": str(device), "engine": engine.mode(),
           "records": [], "evals": [], "wall_s": 0.0, "stopped_early": False}
    start = 0
    resumed = _load_checkpoint(out, model, opt, hooks)
    if resumed is not None:
        _check_resume(out, resumed[1].get("config") or {}, asdict(cfg), resumed[0])
        was = resumed[1].get("engine", "plain")          # a log without one predates the fast engine
        if was != log["engine"]:
            raise RClipError(f"the checkpoint in {out} was trained by the {was!r} engine and this run uses "
                             f"{log['engine']!r}: set RCLIP_ENGINE={was} to resume it, or delete {out} to start again")
        start, log = resumed
        log["config"] = asdict(cfg)      # equal to the checkpoint's but for bookkeeping: record the values used now
        log["resumed_from"] = start
        log["stopped_early"] = False
    if start >= cfg.steps:
        return log

    train_model = model if module is None else module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = engine.TrainingForward(train_model, device, cfg.amp)

    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.steps, start=start, rank=rank, world=world,
                               seed=cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate, num_workers=cfg.num_workers,
                        persistent_workers=False, prefetch_factor=2 if cfg.num_workers else None)
    t0 = time.time() - log["wall_s"]
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or rank != 0, desc=desc, dynamic_ncols=True)
    step = start
    for batch in loader:
        if hooks is not None:
            hooks.before_step(step)
        lr = lr_at(step, cfg) * (hooks.lr_scale(step) if hooks is not None else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(train_model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            scale = model.logit_scale.detach().exp()
            rec = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "logit_scale": round(scale.item(), 3),
                   "samples": step * cfg.batch_size, "wall_s": round(time.time() - t0, 1)}
            log["records"].append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", scale=f"{rec['logit_scale']:.1f}")
        if evaluate is not None and rank == 0 and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            model.eval()
            log["evals"].append({"step": step, "samples": step * cfg.batch_size, **evaluate(bundle)})
            model.train()
        out_of_time = cfg.max_minutes is not None and (time.time() - t0) > 60 * cfg.max_minutes
        if world > 1:
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag)
            out_of_time = bool(flag.item() > 0)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
            log["wall_s"] = round(time.time() - t0, 1)
            log["last_step"] = step
            if rank == 0:
                _save_checkpoint(out, step, model, opt, log, hooks)
            if world > 1:
                dist.barrier()
        if out_of_time:
            log["stopped_early"] = step < cfg.steps
            break
    bar.close()
    model.eval()
    log["wall_s"] = round(time.time() - t0, 1)
    log["last_step"] = step
    return log


# ----------------------------------------------------------------------------------------------------------------
# Train once, cache, reuse
# ----------------------------------------------------------------------------------------------------------------

def save_tower(path: Path, state: dict) -> None:
    """Write an image tower's state dict as float32 safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(tmp))


def verify_artefact(path: Path, log_path: Path, extra_path: Path | None = None) -> None:
    """Check a cached artefact against the checksums its log recorded when it was written; raise naming the file
    and the fix when it differs (a corrupted or replaced file is never read back as the model that was trained)."""
    log = json.loads(log_path.read_text(encoding="utf-8"))
    sums = log.get("artefact_sha256")
    if not isinstance(sums, dict) or "model" not in sums:
        raise RClipError(f"{log_path} records no checksum of {path.name} (an artefact written by older code): delete "
                         f"{path.with_suffix('')}.* and re-run to rebuild it")
    files = [(path, sums["model"])] + ([(extra_path, sums["extra"])] if "extra" in sums and extra_path else [])
    for file, want in files:
        if not file.is_file() or sha256(file) != want:
            raise RClipError(f"cached artefact {file} does not match the checksum recorded in {log_path} (corrupted "
                             f"or replaced): delete {path.with_suffix('')}.* and re-run to rebuild it")


def train_cached(kind: str, key: dict, train: Callable[[Path], tuple], *, base: CLIPBundle | None = None,
                 part: str = "model", device: torch.device | str | None = None, root: str | Path | None = None
                 ) -> tuple[CLIPBundle, dict, object]:
    """The one train-and-cache rule of the library: a trained model is made once per cache key and read back
    from ``$RCLIP_CACHE/<kind>/`` afterwards.

    key: every setting that changes the weights (dataclass configs allowed; :func:`rclip.cache.cache_key` drops
    the loop's bookkeeping fields, and the code's hash is added). Name the device in it only where it changes the
    result. train: ``train(run_dir) -> (bundle, log)`` or ``(bundle, log, extra)``, training a copy it makes
    itself and checkpointing into ``run_dir`` (an interrupted run resumes from there); ``extra`` (tensors, plain
    Python) is stored beside the model. part: ``"model"`` stores the whole CLIP, ``"visual"`` only its image
    tower (read back onto a copy of ``base``).

    The artefact is written atomically, its log last (so a partly written artefact is never read as whole), and
    ``run_dir``'s checkpoints are removed once it is in place. Both a fresh run and a cached one return what is read
    back from disk: ``(bundle, log, extra)``.
    """
    from rclip import models
    from rclip.cache import artefact_path

    if part not in ("model", "visual"):
        raise RClipError(f"part must be 'model' or 'visual', got {part!r}")
    if part == "visual" and base is None:
        raise RClipError("a cached image tower is read back onto a copy of `base`; pass base=")
    path = artefact_path(kind, key, ".safetensors", root=root)
    log_path, extra_path = path.with_suffix(".log.json"), path.with_suffix(".extra.pt")
    if path.is_file() and log_path.is_file():
        verify_artefact(path, log_path, extra_path)
    else:
        run_dir = path.with_suffix(".run")
        out = tuple(train(run_dir))
        bundle, log, extra = (out + (None,))[:3]
        if log.get("stopped_early"):
            raise RClipError(f"{kind} training stopped early at step {log.get('last_step')}; run again to resume "
                             f"from {run_dir}")
        bundle.model.eval().requires_grad_(False)
        if extra is not None:
            with atomic_path(extra_path) as tmp:
                torch.save(extra, tmp)
        if part == "model":
            models.save(bundle, path, extra={"trained": kind})
        else:
            save_tower(path, bundle.model.visual.state_dict())
        checksums = {"model": sha256(path), **({"extra": sha256(extra_path)} if extra is not None else {})}
        write_json(log_path, {**log, "artefact_sha256": checksums})   # last: its presence marks the artefact whole
        shutil.rmtree(run_dir, ignore_errors=True)
    from rclip.cache import note_used

    note_used(kind, path, json.loads(log_path.read_text(encoding="utf-8"))["artefact_sha256"]["model"])
    dev = device if device is not None else (base.device if base is not None else "cpu")
    if part == "model":
        bundle = models.load(None, checkpoint=path, device=dev)
    else:
        bundle = base.with_visual(read_state_dict(path)[0])
    extra = torch.load(extra_path, map_location="cpu", weights_only=True) if extra_path.is_file() else None
    return bundle, json.loads(log_path.read_text(encoding="utf-8")), extra
