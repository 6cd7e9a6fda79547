"""What the benchmarks share: clocks that wait for CUDA, the run options every script takes (``--threads --seed
--json``), and writing the results. Scripts import it as ``common`` (they run as ``python benchmarks/<name>.py``)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

THREADS_HELP = ("torch CPU threads (default: torch's); 1 on a CPU shared with another job, where waiting for a "
                "second thread's time slice dominates small kernels")


def sync(device) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock(fn, device):
    """(seconds, result) of one call of ``fn``, synchronised on ``device``."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def timed(fn, device, repeat: int):
    """(median seconds, every run's seconds, last result) of ``repeat`` calls after one warm-up call."""
    fn()
    runs = [clock(fn, device) for _ in range(repeat)]
    times = [t for t, _ in runs]
    return statistics.median(times), times, runs[-1][1]


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results here")


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, refuse ``--device cuda`` without a CUDA device, and apply ``--threads``."""
    args = p.parse_args(argv)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_json(path: str | None, out: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {path}")
