"""Image decode speed: torchvision.io (the loader's decoder until 2026-11-26) vs decode_rgb (now).

torchvision's PNG decoder kills the process (SIGSEGV) on many damaged PNGs, so decode_rgb lets
Pillow parse every header and decode PNG/WebP/GIF, and keeps torchvision's libjpeg-turbo decoder
for JPEG (fuzzing never crashed it). This prints what that costs, one thread, the decoders
measured in alternating rounds of the same run (so a busy machine slows all alike), on:
  demo   the bundled demo PNGs (32x32 RGB digits)
  jpeg   generated 500x375 JPEGs (quality 90, about ImageNet's size and bytes)
for decode only and for the whole pre-training sample transform (decode + RandomResizedCrop +
flip + BootMAE mask; 224 px for the JPEGs, 32 px for the demo). "pillow only" is the
alternative of decoding JPEG with Pillow too.

    python bench/decode.py [--images 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tarfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bootmae_ds.config import load_config
from bootmae_ds.data import transforms
from bootmae_ds.data.demo import ensure_demo_shards
from bootmae_ds.data.sources import write_synthetic_folder
from bootmae_ds.data.transforms import SampleTransform


def torchvision_decode(data: bytes | torch.Tensor) -> torch.Tensor:
    """The previous decode_rgb: torchvision.io.decode_image (crashes on damaged PNGs)."""
    from torchvision.io import ImageReadMode, decode_image

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(encoded, mode=ImageReadMode.RGB)


def pillow_decode(data: bytes | torch.Tensor) -> torch.Tensor:
    """Every format through Pillow (what decode_rgb does for PNG, WebP and GIF)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def demo_pngs(n: int) -> list[bytes]:
    root = ensure_demo_shards() / "train"
    out: list[bytes] = []
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]
        if len(out) >= n:
            break
    return out[:n]


def jpegs(n: int, tmp: Path) -> list[bytes]:
    paths = write_synthetic_folder(tmp, 8, (n + 7) // 8, size=(375, 500), quality=90)
    return [p.read_bytes() for p in paths[:n]]


def rates(fns: dict[str, Callable[[bytes], object]], images: list[bytes], rounds: int) -> dict[str, list[float]]:
    """images/s of each function over ``images``, once per round, the functions alternating."""
    for fn in fns.values():  # warm-up
        for data in images[:8]:
            fn(data)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for data in images:
                fn(data)
            out[name].append(len(images) / (time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sets = {"demo": demo_pngs(args.images), "jpeg": jpegs(args.images, Path(tmp))}
    sizes = {"demo": 32, "jpeg": 224}
    decoders = {"torchvision": torchvision_decode, "decode_rgb": transforms.decode_rgb,
                "pillow only": pillow_decode}
    print(f"{'images':6} {'what':18} {'decoder':12} {'img/s: median (min-max of rounds)':>34}")
    for name, images in sets.items():
        kb = statistics.mean(len(b) for b in images) / 1024
        cfg = load_config("demo", [f"model.img_size={sizes[name]}"] + (
            ["model.patch_size=16", "mask.num_masked=147", "mask.block_budget=120",
             "mask.min_block_patches=16", "mask.max_block_patches=60"] if name == "jpeg" else []))
        transform = SampleTransform.from_config(cfg)
        for what in ("decode", "decode+transform"):
            fns = decoders if what == "decode" else {
                k: (lambda data, d=d, t=transform: t(d(data), 0, "k")) for k, d in decoders.items()}
            result = rates(fns, images, args.rounds)
            base = statistics.median(result["torchvision"])
            for dec_name, r in result.items():
                m = statistics.median(r)
                print(f"{name:6} {what:18} {dec_name:12} {m:9.0f} ({min(r):.0f}-{max(r):.0f}) "
                      f"{m / base:5.2f}x   {len(images)} x {kb:.1f} kB")


if __name__ == "__main__":
    main()
