"""The ``rclip`` command line.

    rclip book --profile cpu [--only 00_world] [--set 01_cola.n_eval=500]   execute the notebooks, build the book
    rclip book --profile world --publish                       the published book (writes book/)
    rclip book --profile world --verify [--only 00_world]      re-run it with a fresh cache, list what differs
    rclip world-clip train --profile gpu [--device cuda]       pre-train and write the shipped world CLIP
    rclip world-clip check                                     verify the shipped file against its checksum
    rclip cache list|verify|prune                              the artefact cache ($RCLIP_CACHE)
    rclip profiles                                             list profiles and what they are for
"""
from __future__ import annotations

import argparse
import shlex
import sys

from rclip.errors import RClipError


def _cmd_world_clip(args: argparse.Namespace) -> int:
    from rclip import models
    from rclip.profiles import load_profile

    if args.action == "check":
        path = models.WORLD_CLIP_DIR / "model.safetensors"
        want = (models.WORLD_CLIP_DIR / "SHA256SUMS").read_text().split()[0]
        got = models.sha256(path)
        print(f"{path}: {'OK' if got == want else 'MISMATCH'} ({got})")
        return 0 if got == want else 1

    from rclip.world_clip import train_world_clip

    settings = dict(load_profile(args.profile).get("world_clip") or {})
    if not settings:
        raise RClipError(f"profile {args.profile!r} has no world_clip section; the world CLIP is trained at "
                         "profile 'gpu' (or 'smoke' for a test run)")
    for key in ("steps", "batch_size", "num_workers"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    command = "rclip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    assets = None if args.no_write else (args.assets_dir or models.WORLD_CLIP_DIR)
    log = train_world_clip(settings, device=args.device, assets_dir=assets, run_dir=args.run_dir,
                           command=command, max_minutes=args.max_minutes, rank_weights_dir=args.rank_weights,
                           progress=not args.quiet)
    if log.get("evals"):
        print("final validation:", log["evals"][-1])
    return 0


def _cmd_book(args: argparse.Namespace) -> int:
    from rclip.book import run_book, verify_book

    args.profile = args.profile or ("world" if (args.verify or args.publish) else "cpu")
    if args.verify:
        if args.publish or args.set:
            raise RClipError("--verify re-runs the published profile as it is: drop --publish and --set")
        return verify_book(args.profile, only=args.only)
    return run_book(args.profile, publish=args.publish, only=args.only, build=not args.no_build,
                    out=args.out, overrides=args.set)


def _cmd_cache(args: argparse.Namespace) -> int:
    import shutil

    from rclip.cache import cache_root, entries, verify_entries

    root = cache_root()
    if args.action == "list":
        for e in entries(root):
            print(f"{e['kind']:18s} {e['status']:11s} {e['bytes'] / 2**20:9.1f} MB  {e['path'].name}")
        print(f"cache: {root}")
        return 0
    bad = verify_entries(root)
    for path, problem in bad:
        print(f"BAD  {path}: {problem}")
    if args.action == "verify":
        print(f"{len(bad)} artefact(s) fail verification in {root}")
        return 1 if bad else 0
    removed = 0                                     # prune: what cannot be read as whole, and what fails verification
    for e in entries(root):
        if e["status"] in ("partial", "incomplete") or any(e["path"] == p for p, _ in bad):
            for f in [e["path"], e["path"].with_suffix(".log.json"), e["path"].with_suffix(".extra.pt")]:
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                elif f.exists():
                    f.unlink()
            removed += 1
    print(f"pruned {removed} entr{'y' if removed == 1 else 'ies'} from {root} (checkpoint directories of interrupted "
          f"runs are kept: they resume)")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from rclip.profiles import list_profiles, load_profile

    for name in list_profiles():
        description = str(load_profile(name).get("description") or "").strip().splitlines() or [""]
        print(f"{name:8s} {description[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("book", help="execute the notebooks under a profile and build the HTML book")
    b.add_argument("--profile", default=None, help="cpu (default), or world with --publish / --verify")
    b.add_argument("--publish", action="store_true",
                   help="write executed notebooks and results into book/ (the committed, published outputs)")
    b.add_argument("--only", nargs="*", help="notebook names to execute (default: all)")
    b.add_argument("--no-build", action="store_true", help="execute notebooks only; skip jupyter-book build")
    b.add_argument("--out", help="output directory for unpublished runs (default _build/<profile>)")
    b.add_argument("--verify", action="store_true",
                   help="re-execute the published chapters with a fresh cache into a scratch directory and list every "
                        "figure that differs from book/results (exit 1 if any)")
    b.add_argument("--set", action="append", metavar="NB.KEY=VALUE",
                   help="override one notebook parameter on top of the profile, e.g. --set 01_cola.n_eval=500 "
                        "(repeatable; values are YAML)")
    b.set_defaults(func=_cmd_book)

    w = sub.add_parser("world-clip", help="train or check the shipped world CLIP")
    w.add_argument("action", choices=["train", "check"])
    w.add_argument("--profile", default="gpu")
    w.add_argument("--device", default="auto")
    w.add_argument("--steps", type=int)
    w.add_argument("--batch-size", type=int)
    w.add_argument("--num-workers", type=int)
    w.add_argument("--max-minutes", type=float, help="stop cleanly (checkpointed) after this many minutes")
    w.add_argument("--assets-dir", help="where to write the model (default: the package's assets)")
    w.add_argument("--run-dir", help="checkpoint directory (default: in the cache, keyed by the settings)")
    w.add_argument("--rank-weights", help="also write each rank's final weights here (DDP test)")
    w.add_argument("--no-write", action="store_true", help="train without writing the assets")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=_cmd_world_clip)

    c = sub.add_parser("cache", help="list, verify (against the checksums written with them) or prune cached artefacts")
    c.add_argument("action", choices=["list", "verify", "prune"])
    c.set_defaults(func=_cmd_cache)

    p = sub.add_parser("profiles", help="list the profiles")
    p.set_defaults(func=_cmd_profiles)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RClipError as exc:
        print(f"rclip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
