"""WebDataset tar shards: the sample layout, the manifest, atomic writing and verification.

A shard is a plain tar. Sample ``KEY`` is stored as consecutive members ``KEY.<ext>`` (the
encoded image: jpg, png or webp), ``KEY.cls`` (the class index as ASCII) and ``KEY.json``
(``{"path": relative source path, "class": class name}``); a segmentation sample has ``KEY.seg.png``
(its label map) instead of ``KEY.cls``. Keys never contain a dot: webdataset
splits member names at the first dot, so ``a.1.jpg`` and ``a.2.jpg`` would merge into one sample.

``manifest.json`` beside the shards records, per shard, its file name, sample count, byte size
and sha256, plus totals and the files the builder skipped. Readers trust a shard only as far as
the manifest vouches for it: a tar cut exactly at a header boundary reads back as a shorter, valid
tar, and only the recorded count and checksum reveal it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bootmae_ds.config.base import InputError

MANIFEST_NAME = "manifest.json"
CLASSES_NAME = "classes.json"
FORMAT = "bootmae-ds-shards/1"
IMAGE_EXTS = ("jpg", "png", "webp")
SEG_MEMBER = "seg.png"  # a segmentation sample's label map (KEY.seg.png, no .cls)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ShardError(InputError, RuntimeError):
    """A shard that is missing, or disagrees with its manifest."""


def make_key(index: int, relpath: str, max_len: int = 80) -> str:
    """A unique, dot-free sample key: the build index plus a readable slug of the source path."""
    slug = _KEY_UNSAFE.sub("_", Path(relpath).with_suffix("").as_posix()).strip("_")
    return f"{index:09d}_{slug}"[:max_len]


def split_member(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): split at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


@dataclass
class ShardRecord:
    """One shard as the manifest records it."""

    name: str
    count: int
    bytes: int
    sha256: str
    skipped: list[dict[str, str]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class Manifest:
    """The contents of ``manifest.json``."""

    shards: list[ShardRecord]
    classes: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was read from (not serialised)

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "num_shards": len(self.shards),
            "num_classes": len(self.classes),
            "classes_file": CLASSES_NAME,
            "shards": [s.public() for s in self.shards],
            "skipped": self.skipped,
            "build": self.build,
        }

    def write(self, out_dir: Path) -> Path:
        """Write ``classes.json`` and ``manifest.json`` atomically into ``out_dir``."""
        atomic_write_text(out_dir / CLASSES_NAME, json.dumps(self.classes, indent=1))
        path = out_dir / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"manifest {path} does not exist; build the shards with "
                             f"`python data_prep/build_shards.py SRC {path.parent}`")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ShardError(f"manifest {path}: format {data.get('format')!r}, expected {FORMAT!r}")
        classes_path = path.parent / data.get("classes_file", CLASSES_NAME)
        classes = json.loads(classes_path.read_text()) if classes_path.is_file() else []
        shards = [ShardRecord(**s) for s in data["shards"]]
        return cls(shards, classes, data.get("skipped", []), data.get("build", {}), path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)


class ShardWriter:
    """Writes one shard to ``<name>.tmp-<pid>`` and renames it into place on ``close()``.

    Member headers are normalised (mtime 0, no owner) so a rebuild gives identical bytes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # Held open across write() calls and closed by close() or abort(), hence no `with`.
        self._file = open(self.tmp, "wb")  # noqa: SIM115
        self._hash = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, ext: str, label: int | None, meta: dict[str, Any],
              extra: dict[str, bytes] | None = None) -> None:
        """One sample: the image, ``.cls`` (unless ``label`` is None), ``extra`` members (a
        segmentation sample's ``seg.png``), ``.json``."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {ext!r} not in {IMAGE_EXTS}")
        self._add(f"{key}.{ext}", image)
        if label is not None:
            self._add(f"{key}.cls", str(label).encode())
        for member, data in (extra or {}).items():
            self._add(f"{key}.{member}", data)
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.count += 1

    def close(self) -> ShardRecord:
        """Finish the tar, rename it into place and return its record."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return ShardRecord(self.path.name, self.count, self._hash.size, self._hash.sha.hexdigest())

    def abort(self) -> None:
        """Drop the partial file (an interrupted shard must never look complete)."""
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def check_file(path: Path, record: ShardRecord) -> str | None:
    """Cheap identity check of a shard file against its record: the problem, or None if good."""
    if not path.is_file():
        return f"{path.name}: missing"
    size = path.stat().st_size
    if size != record.bytes:
        return f"{path.name}: {size} bytes on disk, recorded {record.bytes}"
    digest = file_sha256(path)
    if digest != record.sha256:
        return (f"{path.name}: sha256 {digest[:12]}... differs from the recorded "
                f"{record.sha256[:12]}...")
    return None


def iter_tar_samples(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for every sample of a tar stream; raises on a damaged tar."""
    key, parts = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_member(member.name)
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if key is not None:
        yield key, parts


def image_member(parts: dict[str, Any]) -> str | None:
    """The extension of a sample's image member, if it has one."""
    return next((e for e in IMAGE_EXTS if e in parts), None)


def verify_shard(path: Path, record: ShardRecord, decode: bool = True) -> list[str]:
    """Every problem with one shard: file identity, sample count, member layout, decodability."""
    problem = check_file(path, record)
    if problem:
        return [problem]
    from bootmae_ds.data.transforms import decode_rgb  # torchvision import only when decoding

    problems: list[str] = []
    count = 0
    try:
        with open(path, "rb") as f:
            for key, parts in iter_tar_samples(f):
                count += 1
                ext = image_member(parts)
                if ext is None or not ("cls" in parts or SEG_MEMBER in parts):
                    problems.append(f"{path.name}: sample {key} lacks an image or a .cls / .{SEG_MEMBER} member")
                    continue
                if decode:
                    try:
                        image = decode_rgb(parts[ext])
                        if SEG_MEMBER in parts:  # a segmentation sample: its label map fits its image
                            from PIL import Image

                            with Image.open(io.BytesIO(parts[SEG_MEMBER])) as label:
                                if label.mode not in ("L", "P") or label.size[::-1] != tuple(image.shape[-2:]):
                                    raise ValueError(f"label map {label.mode} {label.size} for an image of "
                                                     f"{tuple(image.shape[-2:])[::-1]}")
                                label.load()
                    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad sample
                        problems.append(f"{path.name}: sample {key} does not decode ({err})")
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{path.name}: unreadable tar after {count} samples ({err})")
    if count != record.count:
        problems.append(f"{path.name}: {count} samples, manifest says {record.count}")
    return problems


def _verify_one(args: tuple[Path, ShardRecord, bool]) -> list[str]:
    return verify_shard(*args)


def verify_manifest(
    path: str | Path, decode: bool = True, workers: int = 1
) -> dict[str, list[str]]:
    """{shard name: problems} for every shard the manifest lists (an empty list = good)."""
    manifest = Manifest.read(path)
    root = manifest.path.parent  # type: ignore[union-attr]
    tasks = [(root / s.name, s, decode) for s in manifest.shards]
    if decode:  # import the decoder once here, so forked workers inherit it
        import bootmae_ds.data.transforms  # noqa: F401
    if workers <= 1:
        results = list(map(_verify_one, tasks))
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_verify_one, tasks))
    return {s.name: r for s, r in zip(manifest.shards, results)}
