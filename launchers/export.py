"""Export a pre-trained encoder as timm's ViT (model.safetensors + config.json + README.md), or a
run's whole model as a released BootMAE file (``--format official``: one .pth with ``model`` and
``model_ema`` keyed as the official pre-training model).

    python launchers/export.py runs/b800 --out exports/b800                       # latest, online
    python launchers/export.py runs/b800 --tag step_00100000 --which momentum --out exports/b800_ema
    python launchers/export.py --official BootMAE_Base_800_PT.pth --arch base --out exports/official_b
    python launchers/export.py runs/b800 --format official --out exports/b800.pth   # official layout

Runs on one CPU process whatever the world size of the checkpoint. Exit status 2 on bad input,
with one line naming the path and what to do; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="export a BootMAE encoder to timm's ViT layout",
                                     epilog="docs: docs/export-and-interop.md")
    parser.add_argument("run", nargs="?", type=Path, help="run directory (the pre-training --output-dir)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00001000 (default: latest)")
    parser.add_argument("--official", type=Path, default=None, help="a released BootMAE_*_PT.pth instead of a run")
    parser.add_argument("--arch", default="base", choices=("base", "large"), help="architecture of --official")
    parser.add_argument("--which", default=None, choices=("online", "momentum"),
                        help="which encoder (default online; --format official writes both)")
    parser.add_argument("--format", default="timm", choices=("timm", "official"),
                        help="timm: an encoder directory; official: a run's model as a BootMAE .pth")
    parser.add_argument("--out", required=True, type=Path, help="output directory (--format official: .pth file)")
    parser.add_argument("--force", action="store_true", help="replace the export files in a non-empty --out")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.official is None):
        parser.error("give either a run directory or --official FILE")
    if args.official is not None and args.tag is not None:
        parser.error("--tag applies to a run directory, not to --official")
    if args.format == "official" and (args.official is not None or args.which is not None):
        parser.error("--format official exports a run directory's model and momentum encoder together; "
                     "drop --official / --which")
    args.which = args.which or "online"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation never needs a GPU
    from bootmae_ds.interop.encoders import ExportError, from_official, from_run
    from bootmae_ds.interop.export import check_out_dir, write_export

    if args.format == "official":
        return _official(args)
    try:
        check_out_dir(args.out, args.force)  # before the slow part
        if args.official is not None:
            exp = from_official(args.official, args.arch, args.which)
        else:
            exp = from_run(args.run, args.tag, args.which)
        out = write_export(exp, args.out, args.force)
    except ExportError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, for logs and scripts
        return 2
    p = exp.provenance
    where = f"{p['run_dir']} {p['tag']} (step {p['step']})" if p["source"] == "run" else p["file"]
    print(f"exported the {args.which} encoder of {where} to {out}")
    return 0


def _official(args: argparse.Namespace) -> int:
    from bootmae_ds.interop.encoders import ExportError
    from bootmae_ds.interop.official_export import check_out_file, official_blob, write_official

    try:
        check_out_file(args.out, args.force)  # before the slow part
        blob, p = official_blob(args.run, args.tag)
        out = write_official(blob, args.out, args.force)
    except ExportError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    ema = " and model_ema (momentum encoder)" if "model_ema" in blob else ""
    print(f"exported model{ema} of {p['run_dir']} {p['tag']} (step {p['step']}) in the official layout to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
