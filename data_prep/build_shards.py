"""Write WebDataset shards from an ImageFolder tree or a flat folder + label file.

    python data_prep/build_shards.py /data/imagenet/train /data/shards/train --workers 16
    python data_prep/build_shards.py /data/imagenet/val /data/shards/val --prefix val \
        --labels val_labels.txt --classes /data/shards/train/classes.json
    python data_prep/build_shards.py /data/ADEChallengeData2016 /data/shards/ade_train --segmentation training

Re-running after an interruption keeps the complete shards and builds the rest. See
``bootmae_ds.data.builder`` for the layout, the restart rules and the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _path  # noqa: F401  (repository root on sys.path)

from bootmae_ds.data.builder import BuildError, BuildOptions, build_shards, summary


def parse_size(text: str) -> int:
    """'500MB', '1GiB', '2e9' -> bytes."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="docs: docs/data.md",
    )
    p.add_argument("src", help="ImageFolder root (SRC/<class>/<image>) or a flat image folder")
    p.add_argument(
        "out", help="output directory for <prefix>-NNNNNN.tar, manifest.json, classes.json"
    )
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument(
        "--shard-samples", type=int, default=1000, help="images per shard (default 1000)"
    )
    p.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=None,
        help="cut shards by size instead, e.g. 1GB (source bytes; with --max-side an estimate)",
    )
    p.add_argument("--seed", type=int, default=0, help="file-order shuffle seed (default 0)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)"
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="re-encode images whose longer side exceeds this (JPEG); default: copy bytes",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality with --max-side")
    p.add_argument(
        "--labels",
        default=None,
        help="label file for a flat folder: 'filename label' lines, or one label per line",
    )
    p.add_argument(
        "--classes", default=None, help="classes.json fixing the class order (e.g. train's)"
    )
    p.add_argument(
        "--segmentation", default=None, metavar="SPLIT",
        help="SRC is an ADE20K-style root: shard SRC/images/SPLIT with their label maps "
        "SRC/annotations/SPLIT/<name>.png (each sample: image, .seg.png, .json)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs of a different build, or recorded shards that changed",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    opts = BuildOptions(
        prefix=a.prefix,
        shard_samples=a.shard_samples,
        shard_bytes=a.shard_bytes,
        seed=a.seed,
        workers=a.workers,
        max_side=a.max_side,
        quality=a.quality,
        labels=a.labels,
        classes=a.classes,
        segmentation=a.segmentation,
    )
    start = time.perf_counter()
    try:
        manifest = build_shards(
            a.src,
            a.out,
            opts,
            overwrite=a.overwrite,
            progress=not a.no_progress,
            log=lambda m: print(m, file=sys.stderr),
        )
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = summary(manifest) | {
        "seconds": round(time.perf_counter() - start, 2),
        "manifest": str(manifest.path),
    }
    print(json.dumps(info))
    for s in manifest.skipped[:20]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
