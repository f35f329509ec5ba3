"""Build the demo shards (scikit-learn's 1,797 handwritten digits as 32x32 RGB) into OUT/train
and OUT/test. The demo preset builds the same data into its cache by itself on first use.

    python data_prep/make_demo_shards.py OUT
"""

from __future__ import annotations

import argparse
import json
import sys

import _path  # noqa: F401  (repository root on sys.path)

from bootmae_ds.data.demo import build_demo_shards
from bootmae_ds.data.shards import Manifest, ShardError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="docs: docs/data.md",
    )
    p.add_argument("out", help="output directory (gets train/ and test/)")
    a = p.parse_args(argv)
    try:
        root = build_demo_shards(a.out)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split in ("train", "test"):
        m = Manifest.read(root / split)
        print(
            json.dumps(
                {
                    "split": split,
                    "manifest": str(m.path),
                    "samples": m.total_samples,
                    "shards": len(m.shards),
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
