"""Build WebDataset shards from an ImageFolder tree or the ImageNet validation layout.

The build is planned up front (sorted file list, shuffled with ``seed``, cut into shards) and
the plan's fingerprint is stored in ``OUT/.build/plan.json``. Each shard is written by one
worker process to a temporary file, renamed into place, and then recorded in
``OUT/.build/<shard>.json`` (count, bytes, sha256, skipped files). A re-run with the same plan
keeps every shard whose file matches its record and rebuilds only the rest; outputs from a
different plan, or recorded shards that no longer match, are never replaced without
``overwrite=True``. ``manifest.json`` is written last, so its presence means a complete build.

Without ``max_side`` the original encoded bytes are copied: files are only sniffed (a header
parse, no pixel decoding) to reject non-images and to name the member's extension.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from bootmae_ds.data.segmentation import SegmentationDataError, label_path, scan_pairs
from bootmae_ds.data.shards import (
    MANIFEST_NAME,
    SEG_MEMBER,
    Manifest,
    ShardRecord,
    ShardWriter,
    atomic_write_text,
    check_file,
    make_key,
)
from bootmae_ds.data.sources import scan_image_folder

_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_TAR_OVERHEAD = 3 * 1024  # three members' headers and padding per sample, for byte-sized shards


class BuildError(RuntimeError):
    """A build that cannot start or continue; the message says what to do."""


@dataclass
class BuildOptions:
    prefix: str = "train"
    shard_samples: int | None = 1000  # cut a shard after this many files ...
    shard_bytes: int | None = None  # ... or once its source bytes reach this (exclusive)
    seed: int = 0  # file-order shuffle; shards then hold a class mix
    workers: int = 1
    max_side: int | None = None  # re-encode images whose longer side exceeds this
    quality: int = 90  # JPEG quality of re-encoded images
    labels: str | None = None  # label file of the flat (ImageNet validation) layout
    classes: str | None = None  # JSON list of class names that fixes the class indices
    segmentation: str | None = None  # split of an ADE20K-style root: images + label maps (KEY.seg.png)


Item = tuple[int, str, int]  # (build index, relative path, class index)


def _read_labels(path: Path, files: list[str]) -> dict[str, str]:
    """``filename label`` lines, or one label per line for the sorted files."""
    rows = [ln.replace(",", " ").split() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    if all(len(r) == 2 for r in rows):
        return {r[0]: r[1] for r in rows}
    if all(len(r) == 1 for r in rows):
        if len(rows) != len(files):
            raise BuildError(f"{path}: {len(rows)} labels for {len(files)} files; a one-column "
                             f"label file needs one label per image, in sorted file-name order")
        return {f: r[0] for f, r in zip(files, rows)}
    raise BuildError(f"{path}: expected 'filename label' lines or one label per line")


def _class_index(tokens: set[str], classes_file: str | None) -> list[str]:
    if classes_file:
        return json.loads(Path(classes_file).read_text())
    if all(t.isdigit() for t in tokens):
        return [str(i) for i in range(max(int(t) for t in tokens) + 1)]
    return sorted(tokens)


def scan_source(
    src: Path, opts: BuildOptions
) -> tuple[list[str], list[tuple[str, int]], list[dict[str, str]]]:
    """(classes, [(relative path, class index)], skipped) of ``src``; raises on a bad layout."""
    if not src.is_dir():
        raise BuildError(f"SRC {src} is not a directory")
    if opts.segmentation:
        return _scan_segmentation(src, opts)
    entries = [p for p in src.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise BuildError(f"SRC {src} is empty")
    top = sorted(p.name for p in entries if p.is_file())
    if opts.labels:  # flat layout: SRC/<image> + a label file
        if not top:
            raise BuildError(f"SRC {src} has no image files at top level for the --labels layout")
        labels = _read_labels(Path(opts.labels), top)
        classes = _class_index({labels[f] for f in top if f in labels}, opts.classes)
        lookup = {c: i for i, c in enumerate(classes)}
        files, skipped = [], []
        for f in top:
            tok = labels.get(f)
            if tok is None:
                skipped.append({"path": f, "reason": f"no label in {opts.labels}"})
            elif tok in lookup:
                files.append((f, lookup[tok]))
            elif tok.isdigit() and int(tok) < len(classes):
                files.append((f, int(tok)))
            else:
                skipped.append({"path": f, "reason": f"label {tok!r} is not a known class"})
        return classes, files, skipped
    if not any(p.is_dir() for p in entries):
        raise BuildError(
            f"SRC {src}: unknown layout: files but no class folders. An ImageFolder "
            f"tree is SRC/<class>/<image>; a flat validation folder needs --labels FILE"
        )
    classes, files = scan_image_folder(src)
    skipped = [{"path": f, "reason": "not inside a class folder"} for f in top]
    if opts.classes:  # keep the indices of an earlier build (e.g. train's classes.json)
        wanted = json.loads(Path(opts.classes).read_text())
        remap = {i: wanted.index(c) for i, c in enumerate(classes) if c in wanted}
        skipped += [{"path": f, "reason": "class folder not in --classes"}
                    for f, i in files if i not in remap]
        files = [(f, remap[i]) for f, i in files if i in remap]
        classes = wanted
    if not files:
        raise BuildError(f"SRC {src} is empty: no files inside its class folders")
    return classes, files, skipped


def _scan_segmentation(src: Path, opts: BuildOptions) -> tuple[list[str], list[tuple[str, int]], list[dict[str, str]]]:
    """The images of an ADE20K-style split, each checked to have a label map of its size."""
    if opts.max_side is not None:
        raise BuildError("--max-side re-encodes images, and their label maps would no longer fit them; "
                         "build segmentation shards without it")
    try:
        images = scan_pairs(src, opts.segmentation)  # type: ignore[arg-type]
    except SegmentationDataError as err:
        raise BuildError(str(err)) from None
    names = src / "classes.txt"
    classes = [n for n in names.read_text().splitlines() if n.strip()] if names.is_file() else []
    return classes, [(rel, 0) for rel in images], []


def plan_shards(src: Path, files: list[tuple[str, int]], opts: BuildOptions) -> list[list[Item]]:
    """Shuffle the file order with ``opts.seed`` and cut it into shards."""
    order = list(files)
    random.Random(opts.seed).shuffle(order)
    items = [(i, rel, label) for i, (rel, label) in enumerate(order)]
    if opts.shard_bytes is None:
        n = opts.shard_samples or 1000
        return [items[i : i + n] for i in range(0, len(items), n)]
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        cost = os.path.getsize(src / item[1]) + _TAR_OVERHEAD
        if shards[-1] and (
            size + cost > opts.shard_bytes
            or (opts.shard_samples and len(shards[-1]) >= opts.shard_samples)
        ):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += cost
    return shards


def encode_item(data: bytes, max_side: int | None, quality: int) -> tuple[bytes, str]:
    """(bytes to store, extension); raises ValueError with the reason for a non-image."""
    try:
        img = Image.open(io.BytesIO(data))  # parses the header only
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except (OSError, SyntaxError) as err:  # PIL raises these for a damaged header
        raise ValueError(f"unreadable image header ({err})") from None
    ext = _FORMATS.get(img.format or "")
    if max_side is None or max(img.size) <= max_side:
        if ext is not None:
            return data, ext  # the common path: copy without decoding
        img.load()  # another format (BMP, TIFF, ...): store it losslessly as PNG
        out = io.BytesIO()
        img.convert("RGB").save(out, format="PNG")
        return out.getvalue(), "png"
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img.draft("RGB", size)  # JPEG: decode at a reduced DCT scale when that still covers size
    img = img.convert("RGB").resize(size, Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), "jpg"


def _build_shard(args: tuple[Path, Path, str, list[Item], list[str], BuildOptions]) -> ShardRecord:
    """Worker: write one shard; unreadable or non-image files are skipped with the reason."""
    src, out, name, items, classes, opts = args
    writer = ShardWriter(out / name)
    skipped = []
    try:
        for index, rel, label in items:
            try:
                data, ext = encode_item((src / rel).read_bytes(), opts.max_side, opts.quality)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                skipped.append({"path": rel, "reason": str(err) or type(err).__name__})
                continue
            if opts.segmentation:
                seg = label_path(src, rel).read_bytes()
                writer.write(make_key(index, rel), data, ext, None, {"path": rel}, {SEG_MEMBER: seg})
                continue
            writer.write(
                make_key(index, rel), data, ext, label, {"path": rel, "class": classes[label]}
            )
        record = writer.close()
    except BaseException:
        writer.abort()
        raise
    record.skipped = skipped
    return record


def _fingerprint(
    src: Path, classes: list[str], shards: list[list[Item]], opts: BuildOptions
) -> str:
    content = {
        "src": str(src.resolve()),
        "classes": classes,
        "shards": shards,
        "max_side": opts.max_side,
        "segmentation": opts.segmentation,
        "quality": opts.quality,
        "prefix": opts.prefix,
    }
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _prepare_out(out: Path, fingerprint: str, opts: BuildOptions, overwrite: bool) -> Path:
    """Check OUT belongs to this plan (or clear it with ``overwrite``); returns the state dir."""
    state = out / ".build"
    plan_path = state / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old["fingerprint"] == fingerprint:
            return state
        if not overwrite:
            raise BuildError(
                f"{out} holds a build from a different source or options; choose "
                f"another OUT, or pass --overwrite to replace it"
            )
        stale = list(old.get("shards", []))
    else:
        stale = [p.name for p in out.glob(f"{opts.prefix}-*.tar")]
        if (stale or (out / MANIFEST_NAME).exists()) and not overwrite:
            raise BuildError(
                f"{out} already holds shards or a manifest this builder did not "
                f"record; choose another OUT, or pass --overwrite to replace them"
            )
    for name in stale:
        (out / name).unlink(missing_ok=True)
        (state / f"{name}.json").unlink(missing_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    return state


def build_shards(
    src: str | Path,
    out: str | Path,
    opts: BuildOptions,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> Manifest:
    """Build (or finish building) the shards of ``src`` in ``out``; returns the manifest."""
    src, out = Path(src), Path(out)
    classes, files, scan_skipped = scan_source(src, opts)
    shards = plan_shards(src, files, opts)
    names = [f"{opts.prefix}-{i:06d}.tar" for i in range(len(shards))]
    fingerprint = _fingerprint(src, classes, shards, opts)
    out.mkdir(parents=True, exist_ok=True)
    state = _prepare_out(out, fingerprint, opts, overwrite)
    state.mkdir(exist_ok=True)
    atomic_write_text(
        state / "plan.json", json.dumps({"fingerprint": fingerprint, "shards": names})
    )
    for leftover in out.glob(f".{opts.prefix}-*.tar.tmp-*"):  # partial files of a killed run
        leftover.unlink()

    records: dict[str, ShardRecord] = {}
    todo, conflicts = [], []
    for name, items in zip(names, shards):
        rec_path = state / f"{name}.json"
        if rec_path.is_file():
            record = ShardRecord(**json.loads(rec_path.read_text()))
            problem = check_file(out / name, record)
            if problem is None:
                records[name] = record
                continue
            if (out / name).exists() and not overwrite:
                conflicts.append(problem)
                continue
            log(f"rebuilding {problem}")
        elif (out / name).exists():
            log(f"rebuilding {name}: written by an interrupted run but never recorded complete")
        todo.append((src, out, name, items, classes, opts))
    if conflicts:
        raise BuildError(
            "recorded shards no longer match their records (modified or damaged):\n  "
            + "\n  ".join(conflicts)
            + "\npass --overwrite to rebuild them"
        )
    if records:
        log(f"keeping {len(records)} complete shards, building {len(todo)}")
    for record in _run(todo, opts.workers, progress, sum(len(t[3]) for t in todo)):
        atomic_write_text(state / f"{record.name}.json", json.dumps(asdict(record)))
        records[record.name] = record

    ordered = [records[n] for n in names]
    skipped = sorted(
        scan_skipped + [s for r in ordered for s in r.skipped], key=lambda s: s["path"]
    )
    build = {"fingerprint": fingerprint, "src": str(src.resolve()), "options": asdict(opts)}
    manifest = Manifest(ordered, classes, skipped, build)
    manifest.path = manifest.write(out)
    return manifest


def _run(tasks: list[tuple], workers: int, progress: bool, total: int) -> Iterator[ShardRecord]:
    """Build shards in ``workers`` processes (in-process for 1), with a progress bar in images."""
    from tqdm import tqdm

    with tqdm(total=total, unit="img", disable=not progress, smoothing=0.1) as bar:
        if workers <= 1 or len(tasks) <= 1:
            results: Iterator[ShardRecord] = map(_build_shard, tasks)
            for record in results:
                bar.update(record.count + len(record.skipped))
                yield record
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_build_shard, t) for t in tasks]
            try:
                for future in as_completed(futures):
                    record = future.result()
                    bar.update(record.count + len(record.skipped))
                    yield record
            finally:  # on an error, don't wait for shards nobody will record
                pool.shutdown(cancel_futures=True)


def summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "shards": len(manifest.shards),
        "samples": manifest.total_samples,
        "bytes": manifest.total_bytes,
        "skipped": len(manifest.skipped),
        "classes": len(manifest.classes),
    }
