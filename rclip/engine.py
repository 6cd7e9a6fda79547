"""How the library spends its compute: the *fast* engine (the default on a CPU with native bf16) or the *plain* one.

The two differ only where a measurement (``benchmarks/bench_engine.py``) showed that speed was on the table:

* **Training** (:class:`TrainingForward`, used by :func:`rclip.train.fit`, the one trainer): the fast engine runs
  the trained network's forward under bfloat16 autocast on the CPU as on CUDA (CPUs with AVX512-BF16 / AMX multiply
  bf16 matrices several times faster than fp32) and, on the CPU, with PyTorch's plain ("math") scaled-dot-product
  attention, whose backward is faster than the fused CPU kernel at these sequence lengths (much faster in bf16);
  AdamW is PyTorch's fused kernel (:func:`rclip.train.make_optimizer`). Losses are computed in fp32 and the
  optimiser keeps fp32 weights. The plain engine trains in fp32 on the CPU (bf16 autocast on CUDA). A model trained
  by one engine differs from the other's (rounding, amplified by training): the engine is part of every cache key
  (:func:`rclip.cache.artefact_path`) and of every result's metadata.
* **Attacks and evaluation** are the same under both engines: fp32 (:func:`rclip.attacks.image.fp32_eval`), also
  the inner attacks of adversarial training, and PyTorch's default attention kernels. Measured and not taken
  (``benchmarks/README.md``): ``torch.compile`` of the image tower for the attack step
  (0.85–1.09× in three runs of ``bench_engine.py``, after seconds to tens of seconds of compilation per shape).

Choose with the environment variable ``RCLIP_ENGINE`` (``fast`` or ``plain``; it reaches the notebooks' kernels)
or :func:`use`. Unset, the engine is ``fast`` on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX) and
``plain`` on one that does not (bf16 is emulated there, slower than fp32).
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from rclip.errors import RClipError

MODES = ("fast", "plain")
ENV = "RCLIP_ENGINE"


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``'s flags);
    without either, bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def mode() -> str:
    """The engine in force: ``$RCLIP_ENGINE`` if set (validated), else ``fast`` on a CPU with native bf16
    (:func:`native_bf16`) and ``plain`` on one without."""
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return "fast" if native_bf16() else "plain"
    value = raw.strip().lower()
    if value not in MODES:
        raise RClipError(f"{ENV}={raw!r} is not an engine: set it to one of {MODES} (or unset it: 'fast' on a "
                         f"CPU with native bf16, else 'plain')")
    return value


def fast() -> bool:
    return mode() == "fast"


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the block (and the notebook kernels it starts) under engine ``name``; the previous setting is restored."""
    if name not in MODES:
        raise RClipError(f"unknown engine {name!r}; choose one of {MODES}")
    previous = os.environ.get(ENV)
    os.environ[ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def training_dtype(device: torch.device | str, amp: bool = True) -> torch.dtype:
    """The autocast dtype a training step's forward runs in: bf16 where ``amp`` and (CUDA, or the CPU under the fast
    engine); else fp32."""
    device = torch.device(device)
    if amp and (device.type == "cuda" or (device.type == "cpu" and fast())):
        return torch.bfloat16
    return torch.float32


class TrainingForward(torch.nn.Module):
    """``module`` as a training step calls it: its forward runs under bf16 autocast where :func:`training_dtype`
    says so (on the CPU then also with the math attention backend), and its half-precision outputs come back in
    fp32, so the loss that follows is computed in fp32. Loss functions call the network only (as under
    DDP), so the wrapper is transparent to them."""

    def __init__(self, module: torch.nn.Module, device: torch.device | str, amp: bool = True):
        super().__init__()
        self.module = module
        self.device_type = torch.device(device).type
        self.dtype = training_dtype(device, amp)
        self.math_attention = self.device_type == "cpu" and self.dtype == torch.bfloat16

    def forward(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device_type=self.device_type, dtype=torch.bfloat16,
                                               enabled=self.dtype == torch.bfloat16))
            if self.math_attention:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            out = self.module(*args, **kwargs)
        return _fp32(out) if self.dtype != torch.float32 else out


def _fp32(out):
    """``out`` with its bf16 / fp16 tensors as fp32: tensors, tuples (named ones too), lists, dicts, and objects with
    a ``.to(dtype=)`` of their own (e.g. :class:`rclip.methods.otcclip.TokenFeatures`); anything else unchanged."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_fp32(o) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_fp32(o) for o in out)
    if isinstance(out, dict):
        return {k: _fp32(v) for k, v in out.items()}
    if hasattr(out, "to") and not isinstance(out, torch.nn.Module):
        return out.to(dtype=torch.float32)
    return out


def describe() -> dict:
    """What the engine in force does, for a result's metadata."""
    if fast():
        return {"mode": "fast", "training": "bf16 autocast of the forward (CPU and CUDA), math attention on the CPU, "
                                            "AdamW fused", "attacks": "fp32"}
    return {"mode": "plain", "training": "bf16 autocast of the forward on CUDA, fp32 on the CPU", "attacks": "fp32"}
