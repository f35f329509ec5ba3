"""Re-read every shard of a build: size, sha256 and sample count against the manifest, and
decode every image. Exits 1 naming each bad shard, 0 if all are good.

    python data_prep/verify_shards.py /data/shards/train [--workers 16] [--no-decode]
    python data_prep/verify_shards.py /shards/imagenet /shards/mine   # each set of a mixture
"""

from __future__ import annotations

import argparse
import os
import sys

import _path  # noqa: F401  (repository root on sys.path)

from bootmae_ds.data.shards import ShardError, verify_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="docs: docs/data.md",
    )
    p.add_argument("out", nargs="+", help="the build directory (holding manifest.json) or the "
                   "manifest path; several: each shard set in turn (the sources of a mixture)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument(
        "--no-decode", action="store_true", help="skip decoding (counts and checksums only)"
    )
    a = p.parse_args(argv)
    return max(verify(out, a) for out in a.out)


def verify(out: str, a: argparse.Namespace) -> int:
    """Verify one shard set: 0 all good, 1 bad shards (named), 2 no such build."""
    try:
        results = verify_manifest(out, decode=not a.no_decode, workers=a.workers)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad = {name: problems for name, problems in results.items() if problems}
    for name, problems in bad.items():
        print(f"BAD {name}", file=sys.stderr)
        for problem in problems[:10]:
            print(f"    {problem}", file=sys.stderr)
        if len(problems) > 10:
            print(f"    ... and {len(problems) - 10} more", file=sys.stderr)
    prefix = f"{out}: " if len(a.out) > 1 else ""
    print(
        f"{prefix}{len(results) - len(bad)}/{len(results)} shards good"
        + (f"; bad: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
