"""The command line shared by the training launchers (``launchers/pretrain.py``, ``finetune.py``):
parse, validate the config before anything heavy, print it, train, map bad input to status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, InputError


def parse_args(description: str, default_config: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               doc: str | None = None) -> argparse.Namespace:
    """The training launchers' flags; ``extra`` adds a launcher's own; ``doc`` is the job's page,
    named at the end of ``--help`` with the configuration reference."""
    epilog = f"docs: {doc}; every config key: docs/configuration.md" if doc else None
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    parser.add_argument("--config", default=default_config, help="preset name or YAML path")
    parser.add_argument("--output-dir", required=True, type=Path, help="run directory")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint) | never | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def eval_only_flags(weights_help: str, ema: bool = False) -> Callable[[argparse.ArgumentParser], None]:
    """``--eval-only --weights FILE`` (and ``--ema``: a released file's ``model_ema``), for ``parse_args(extra=)``."""

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--eval-only", action="store_true", help="score --weights on data.val; no training")
        parser.add_argument("--weights", default=None, help=weights_help)
        if ema:
            parser.add_argument("--ema", action="store_true", help="score the file's model_ema, not its model")

    return add


def eval_only_error(args: argparse.Namespace) -> int | None:
    """Status 2 (after a one-line error) when ``--eval-only`` and ``--weights`` do not come together."""
    if args.eval_only != (args.weights is not None):
        what = "--eval-only and --weights go together (score a file without training)"
    elif getattr(args, "ema", False) and not args.eval_only:
        what = "--ema picks the model_ema of an --eval-only --weights file; add those or drop --ema"
    else:
        return None
    print(f"error: {what}", file=sys.stderr)
    return 2


def training_main(args: argparse.Namespace, load: Callable[[str, list[str]], Any],
                  train: Callable[[], Callable[..., int]]) -> int:
    """Load and print the config, then ``train()(cfg, output_dir, max_steps, resume)``.

    ``train`` returns the training function when called, so DeepSpeed (seconds to import) is
    imported only after the config validated. The status is also written where
    ``$BOOTMAE_EXIT_STATUS_FILE`` says (rank 0), for the SLURM script's requeue decision."""
    status = _train(args, load, train)
    record_exit_status(status)
    return status


def _train(args: argparse.Namespace, load: Callable[[str, list[str]], Any],
           train: Callable[[], Callable[..., int]]) -> int:
    try:
        cfg = load(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if _global_rank() == 0:
        print(cfg.to_yaml(), end="", flush=True)
    try:
        return train()(cfg, args.output_dir, args.max_steps, args.resume)
    except (InputError, FileNotFoundError) as err:  # bad config, checkpoint, shard, path, environment
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def _global_rank() -> int:
    """This process's rank before torch.distributed starts (srun tasks carry SLURM_PROCID only)."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


# Statuses a rerun would end with again (bad input; runtime.run's EXIT_NONFINITE, EXIT_SAVE_FAILED).
FINAL_STATUSES = frozenset({2, 3, 4})


def record_exit_status(status: int) -> None:
    """Record ``status`` for the SLURM script's requeue decision when ``$BOOTMAE_EXIT_STATUS_FILE``
    is set: rank 0 writes every status there; another rank writes a final one (bad input, ...) to
    ``<file>.other_rank`` (atomically; with many ranks, any one of them suffices).

    Under ``srun --kill-on-bad-exit=1`` one failing rank takes the others down, so srun's own
    exit code no longer tells a preemption (75) or bad input (2) from a crash; these files do. The
    first rank to exit decides: a rank that finds bad input first gets rank 0 killed before rank 0
    records anything (seen on the two-node test cluster), hence the second file. No file means no
    rank got to finish deliberately (a crash, a kill, a lost node)."""
    path = os.environ.get("BOOTMAE_EXIT_STATUS_FILE")
    rank = _global_rank()
    if not path or (rank != 0 and status not in FINAL_STATUSES):
        return
    path = path if rank == 0 else f"{path}.other_rank"
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    try:
        tmp.write_text(f"{status}\n")
        os.replace(tmp, path)
    except OSError as err:
        print(f"warning: could not record exit status {status} in {path} ({err})", file=sys.stderr, flush=True)
