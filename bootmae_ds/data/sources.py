"""Where raw samples come from: tar shards (local or ``pipe:``/http URLs), an ImageFolder tree,
or a synthetic generator. All three look alike to the loader: a list of shards with known sample
counts, and ``read(shard, start, stop, wanted)`` yielding the wanted positions in order.

Unwanted positions are passed over without touching their image bytes (a local tar is read in
seekable mode, so skipped members cost a header read and a seek). A position that cannot be
produced (truncated tar, unreadable file, no image member) is yielded with ``error`` set, never
dropped: the loader's batch layout depends on every position being accounted for.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from bootmae_ds.data import plan
from bootmae_ds.data.seeds import mix_seed
from bootmae_ds.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    image_member,
    make_key,
    split_member,
)

if TYPE_CHECKING:  # torch is imported lazily: the shard builder imports this module
    import torch

    from bootmae_ds.config import BootMAEConfig

log = logging.getLogger("bootmae_ds.data")

FOLDER_SHARD_SIZE = 512  # files per virtual shard of an ImageFolder tree
SYNTHETIC_SHARD_SIZE = 256


@dataclass(frozen=True)
class ShardSpec:
    url: str
    count: int
    bytes: int | None = None  # the size the manifest recorded, when known


@dataclass
class RawSample:
    key: str
    data: bytes | torch.Tensor | None  # encoded image, or a decoded uint8 [3, H, W] (synthetic)
    label: int
    error: str | None = None
    origin: str = ""  # the shard URL (or, for an ImageFolder, the file) the sample comes from


Wanted = Callable[[int], bool]


class Source:
    """A list of shards and a way to read positions out of one of them."""

    shards: list[ShardSpec]
    description: str

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def check(self) -> None:
        """Raise early (in the main process) for problems that would otherwise hit every worker."""

    def read(
        self, shard: int, start: int, stop: int, wanted: Wanted
    ) -> Iterator[tuple[int, RawSample]]:
        raise NotImplementedError


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


class TarSource(Source):
    """WebDataset tar shards with per-shard counts from a manifest (or given equal counts)."""

    def __init__(self, shards: list[ShardSpec], description: str, origin: str) -> None:
        self.shards, self.description, self.origin = shards, description, origin
        self.classes: list[str] = []  # unknown

    @classmethod
    def from_manifest(cls, path: str | Path, url_template: str | None = None) -> TarSource:
        manifest = Manifest.read(path)
        root = manifest.path.parent  # type: ignore[union-attr]
        shards = [
            ShardSpec(url_template.format(name=s.name) if url_template else str(root / s.name),
                      s.count, s.bytes)
            for s in manifest.shards
        ]
        source = cls(shards, f"manifest {manifest.path}", f"listed in {manifest.path}")
        source.classes = list(manifest.classes)  # the class names when the shards were built with them
        return source

    @classmethod
    def from_urls(cls, spec: str, num_samples: int | None) -> TarSource:
        """A brace-expanded URL list; counts from a manifest.json beside local shards, else equal
        shares of ``num_samples``."""
        from braceexpand import braceexpand

        urls = [u for part in spec.split("::") for u in braceexpand(part)]
        if all(_is_local(u) for u in urls):
            manifest_path = Path(urls[0]).parent / "manifest.json"
            if manifest_path.is_file():
                records = {s.name: s for s in Manifest.read(manifest_path).shards}
                if all(Path(u).name in records for u in urls):
                    shards = [ShardSpec(u, records[Path(u).name].count, records[Path(u).name].bytes)
                              for u in urls]
                    return cls(shards, f"{len(urls)} shards of {manifest_path}", f"from {spec!r}")
        if num_samples is None or num_samples % len(urls):
            raise ShardError(
                f"data.train={spec!r}: {len(urls)} shard URLs and no manifest.json beside them, so "
                f"the per-shard sample counts are unknown; pass the manifest.json path instead "
                f"(with data.shard_url_template for remote shards), or set data.num_samples to "
                f"the exact total (got {num_samples}), a multiple of the shard count"
            )
        per = num_samples // len(urls)
        return cls([ShardSpec(u, per) for u in urls], f"{len(urls)} shard URLs", f"from {spec!r}")

    def check(self) -> None:
        local = [s for s in self.shards if _is_local(s.url)]
        missing = [s.url for s in local if not os.path.isfile(s.url)]
        if missing:
            raise ShardError(self._missing_message(missing[0], len(missing)))
        # A stat per shard catches most truncations before training; the loader copes with them
        # (lost samples count as corrupt), so this warns instead of refusing to start.
        for s in local:
            size = os.path.getsize(s.url)
            if s.bytes is not None and size != s.bytes:
                log.warning("shard %s: %d bytes on disk, the manifest says %d; run "
                            "data_prep/verify_shards.py and rebuild it", s.url, size, s.bytes)

    def _missing_message(self, url: str, n: int = 1) -> str:
        more = f" (and {n - 1} more)" if n > 1 else ""
        return (
            f"shard {url}{more} {self.origin} does not exist: re-run "
            f"`python data_prep/build_shards.py` to rebuild missing shards, or fix data.train"
        )

    def _open(self, url: str) -> tuple[tarfile.TarFile, BinaryIO | None]:
        """The tar and, for a stream, the stream (tarfile leaves a passed-in file open)."""
        if _is_local(url):
            if not os.path.isfile(url):
                raise ShardError(self._missing_message(url))
            return tarfile.open(url, mode="r:"), None  # seekable: skipped members are seeked over
        from webdataset.gopen import gopen  # handles pipe:, http(s) and friends

        stream = gopen(url, "rb")
        return tarfile.open(fileobj=stream, mode="r|"), stream

    def read(
        self, shard: int, start: int, stop: int, wanted: Wanted
    ) -> Iterator[tuple[int, RawSample]]:
        spec = self.shards[shard]
        name = spec.url.rsplit("/", 1)[-1]
        pos, key, parts, done = -1, None, {}, start  # done: first position not yet yielded
        error = None
        tar = stream = None
        # Any failure to read the tar (a damaged first header, a bad size field, an exception
        # type tarfile documents nowhere) is damage to this shard: it costs the positions not
        # yet read, counted as corrupt, never the run. A shard missing altogether still raises.
        try:
            tar, stream = self._open(spec.url)
            for member in tar:
                k, ext = split_member(member.name)
                if k != key:
                    if key is not None and pos >= start and wanted(pos):
                        yield pos, self._sample(key, parts, name, spec.url)
                    done = max(done, pos + 1)
                    pos, key, parts = pos + 1, k, {}
                    if pos >= stop:
                        break
                if member.isfile() and pos >= start and wanted(pos):
                    parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
            else:
                if key is not None and start <= pos < stop and wanted(pos):
                    yield pos, self._sample(key, parts, name, spec.url)
                done = max(done, pos + 1)
        except ShardError:
            raise
        except Exception as err:  # noqa: BLE001 - see above
            error = f"{name}: tar unreadable after {max(pos, 0)} samples ({type(err).__name__}: {err})"
        finally:
            if tar is not None:
                tar.close()
            if stream is not None:
                stream.close()  # a pipe: closed early exits with SIGPIPE (141), which gopen accepts
        if done < stop:  # the tar ended early: account for every position it did not deliver
            reason = error or f"{name}: {done} samples, expected {spec.count} (truncated shard?)"
            for p in range(done, stop):
                if wanted(p):
                    yield p, RawSample(f"{name}#{p}", None, -1, reason, spec.url)

    def _sample(self, key: str, parts: dict[str, bytes], shard_name: str, origin: str) -> RawSample:
        """One sample from its members (an image and ``.cls``; segmentation shards override it)."""
        return _to_sample(key, parts, shard_name, origin)


def _to_sample(key: str, parts: dict[str, bytes], shard_name: str, origin: str) -> RawSample:
    ext = image_member(parts)
    try:
        label = int(parts["cls"])
    except (KeyError, ValueError):
        label = -1
    if ext is None or label < 0:
        return RawSample(
            key, None, label, f"{shard_name}: sample {key} lacks an image or .cls member", origin
        )
    return RawSample(key, parts[ext], label, None, origin)


def open_source(cfg: BootMAEConfig, name: str | None = None) -> Source:
    """The sample source named by ``cfg.data.train`` (one string). ``name``: the source's name in
    a mixture, which makes a synthetic source's images and keys its own."""
    d = cfg.data
    spec = d.train
    if spec == "demo":
        from bootmae_ds.data.demo import ensure_demo_shards

        return TarSource.from_manifest(ensure_demo_shards(d.cache_dir) / "train" / MANIFEST_NAME)
    if spec == "synthetic":
        if name is None:
            return SyntheticSource(d.num_samples or 1024, cfg.model.img_size, seed=cfg.run.seed)
        return SyntheticSource(d.num_samples or 1024, cfg.model.img_size,
                               seed=mix_seed(cfg.run.seed, "synthetic", name) % 2**63, prefix=name)
    if spec.endswith(".json"):
        return TarSource.from_manifest(spec, d.shard_url_template)
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return TarSource.from_manifest(path / MANIFEST_NAME, d.shard_url_template)
        return FolderSource(path, seed=cfg.run.seed)
    if "{" in spec or spec.startswith("pipe:") or spec.endswith(".tar") or "://" in spec:
        return TarSource.from_urls(spec, d.num_samples)
    raise ShardError(
        f"data.train={spec!r}: not 'demo', 'synthetic', a manifest.json, a shard URL "
        f"list, or an existing directory"
    )


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(relative path, class index)]) of a ``ROOT/<class>/.../<file>`` tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                files.append((Path(dirpath, f).relative_to(root).as_posix(), label))
    return classes, files


class FolderSource(Source):
    """An ImageFolder tree read file by file, in virtual shards of ``FOLDER_SHARD_SIZE`` files.

    The file list is shuffled with a RNG seeded by ``seed`` (the run seed: the same list on every
    rank and after every resume) before it is cut into shards. Listed in class order, each rank
    and worker would read a contiguous stretch of a few classes (the loader shuffles only inside
    its buffer): 4-17 classes per ImageNet micro-batch of 256 instead of about 230.
    """

    def __init__(self, root: str | Path, seed: int = 0) -> None:
        self.root = Path(root)
        self.classes, self.files = scan_image_folder(self.root)
        if not self.files:
            raise ShardError(f"ImageFolder {self.root} holds no files under class folders")
        self.files = [self.files[i] for i in plan.file_order(seed, len(self.files))]
        n = len(self.files)
        self.shards = [
            ShardSpec(f"{self.root}#{i}", min(FOLDER_SHARD_SIZE, n - i))
            for i in range(0, n, FOLDER_SHARD_SIZE)
        ]
        self.description = f"ImageFolder {self.root} ({n} files, {len(self.classes)} classes)"

    def read(
        self, shard: int, start: int, stop: int, wanted: Wanted
    ) -> Iterator[tuple[int, RawSample]]:
        base = shard * FOLDER_SHARD_SIZE
        for p in range(start, stop):
            if not wanted(p):
                continue
            rel, label = self.files[base + p]
            key = make_key(base + p, rel)
            path = self.root / rel
            try:
                yield p, RawSample(key, path.read_bytes(), label, None, str(path))
            except OSError as err:
                yield p, RawSample(key, None, label, f"{rel}: unreadable ({err})", str(path))


class SyntheticSource(Source):
    """Deterministic random images (decoded uint8, so no codec cost) for tests and dry runs."""

    def __init__(self, num_samples: int, size: int, num_classes: int = 10, seed: int = 0,
                 prefix: str = "synthetic") -> None:
        self.size, self.num_classes, self.seed, self.prefix = size, num_classes, seed, prefix
        self.shards = [
            ShardSpec(f"{prefix}#{i}", min(SYNTHETIC_SHARD_SIZE, num_samples - i))
            for i in range(0, num_samples, SYNTHETIC_SHARD_SIZE)
        ]
        self.description = f"synthetic ({num_samples} images of {size}x{size * 5 // 4})"

    def image(self, index: int) -> torch.Tensor:
        """Image ``index``: a smooth random colour field plus noise, uint8 [3, size, 1.25 size]."""
        import torch

        gen = torch.Generator().manual_seed(mix_seed(self.seed, "synthetic", index) % 2**63)
        h, w = self.size, self.size * 5 // 4
        coarse = torch.rand(1, 3, 4, 5, generator=gen) * 255
        field = torch.nn.functional.interpolate(
            coarse, size=(h, w), mode="bilinear", align_corners=False
        )
        noise = torch.randn(1, 3, h, w, generator=gen) * 8
        return (field + noise).clamp(0, 255).to(torch.uint8)[0]

    def read(
        self, shard: int, start: int, stop: int, wanted: Wanted
    ) -> Iterator[tuple[int, RawSample]]:
        base = shard * SYNTHETIC_SHARD_SIZE
        for p in range(start, stop):
            if wanted(p):
                i = base + p
                yield p, RawSample(f"{self.prefix}_{i:09d}", self.image(i), i % self.num_classes,
                                   None, self.shards[shard].url)


def write_synthetic_folder(
    root: str | Path,
    num_classes: int,
    per_class: int,
    size: tuple[int, int] = (96, 128),
    quality: int = 90,
    seed: int = 0,
) -> list[Path]:
    """An ImageFolder tree of synthetic JPEGs ``root/class_<c>/img_<i>.jpg`` (tests, benchmarks)."""
    import torch
    from PIL import Image

    h, w = size
    paths = []
    for c in range(num_classes):
        folder = Path(root) / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            gen = torch.Generator().manual_seed(mix_seed(seed, "folder", c, i) % 2**63)
            coarse = torch.rand(1, 3, 6, 8, generator=gen) * 255
            img = torch.nn.functional.interpolate(
                coarse, size=(h, w), mode="bicubic", align_corners=False
            )
            img = (
                (img + torch.randn(1, 3, h, w, generator=gen) * 10).clamp(0, 255).to(torch.uint8)[0]
            )
            path = folder / f"img_{i:05d}.jpg"
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, format="JPEG", quality=quality)
            paths.append(path)
    return paths
