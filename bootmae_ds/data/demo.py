"""The demo data: scikit-learn's bundled handwritten digits as 32x32 RGB PNG shards.

``load_digits`` ships 1,797 real 8x8 grey images (10 classes) inside scikit-learn, so the demo
needs no download. They are upsampled (bicubic) to 32x32 RGB and split with a fixed stratified
split into 1,500 train and 297 test images; the bytes are identical on every build.

``ensure_demo_shards(cache_dir)`` builds ``<cache>/digits-v1/{train,test}`` on first use. Several
ranks may call it at once: each builds into its own temporary directory and renames it into
place; a rank that loses the race discards its copy and uses the winner's.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from bootmae_ds.data.shards import MANIFEST_NAME, Manifest, ShardError, ShardWriter, make_key

DEMO_NAME = "digits-v1"
SIZE = 32
NUM_TEST = 297
SPLIT_SEED = 0
SHARD_SIZE = 300  # 5 train shards + 1 test shard


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOOTMAE_DS_CACHE", Path.home() / ".cache" / "bootmae_ds"))


def digit_png(pixels: np.ndarray) -> bytes:
    """An 8x8 array of 0..16 -> 32x32 RGB PNG bytes."""
    grey = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    out = io.BytesIO()
    grey.resize((SIZE, SIZE), Image.BICUBIC).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def demo_split() -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` of the fixed train and test splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(np.arange(len(target)), test_size=NUM_TEST,
                                   random_state=SPLIT_SEED, stratify=target)
    return {"train": np.sort(train), "test": np.sort(test)}


def _write_split(
    out: Path, name: str, indices: np.ndarray, images: np.ndarray, target: np.ndarray
) -> None:
    out.mkdir(parents=True)
    records = []
    for first in range(0, len(indices), SHARD_SIZE):
        writer = ShardWriter(out / f"{name}-{first // SHARD_SIZE:06d}.tar")
        for i in indices[first : first + SHARD_SIZE]:
            rel = f"digits/{target[i]}/{i:04d}.png"
            meta = {"path": rel, "class": str(target[i])}
            writer.write(make_key(int(i), rel), digit_png(images[i]), "png", int(target[i]), meta)
        records.append(writer.close())
    build = {"source": "sklearn.datasets.load_digits", "split": name, "split_seed": SPLIT_SEED,
             "size": SIZE}
    Manifest(records, [str(c) for c in range(10)], build=build).write(out)


def build_demo_shards(out: str | Path) -> Path:
    """Build ``OUT/train`` and ``OUT/test`` atomically; an existing complete build is kept."""
    out = Path(out)
    if _complete(out):
        return out
    # _complete is asked again: a racing rank's build may have landed in between.
    if out.exists() and any(out.iterdir()) and not _complete(out):
        raise ShardError(
            f"{out} exists but holds no complete demo build (train/ and test/ "
            f"manifests); remove it or choose another directory"
        )
    from sklearn.datasets import load_digits

    digits = load_digits()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for name, indices in demo_split().items():
            _write_split(tmp / name, name, indices, digits.images, digits.target)
        try:
            if out.exists():
                out.rmdir()  # an empty directory the user made; rename needs it gone
            os.rename(tmp, out)
        except OSError:
            if not _complete(out):  # not a lost race: something else is in the way
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(root: Path) -> bool:
    return all((root / split / MANIFEST_NAME).is_file() for split in ("train", "test"))


def ensure_demo_shards(cache_dir: str | Path | None = None) -> Path:
    """The demo build under ``cache_dir`` (default: $BOOTMAE_DS_CACHE, else ~/.cache/bootmae_ds),
    built on first use."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return build_demo_shards(root / DEMO_NAME)
