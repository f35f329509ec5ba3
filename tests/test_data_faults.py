"""Damaged data never crashes, hangs or stops a run: a seeded fuzzer over JPEG and PNG shards read
by two ranks, exact resume through a damaged epoch, and the decoder on bytes that kill
torchvision's PNG decoder."""

from __future__ import annotations

import faulthandler
import io
import os
import random
import shutil
import signal
import tarfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import loader_config, make_shards
from PIL import Image

from bootmae_ds.data import build_train_loader, plan
from bootmae_ds.data.shards import Manifest, ShardWriter, make_key

CASES = 120  # seeded fuzz cases, half JPEG and half PNG shards
B, WORLD, SHARDS, PER_SHARD = 4, 2, 4, 8  # 32 samples: 4 micro-batches of 4 per rank, none dropped


@dataclass
class Sample:
    key: str
    members: list[tuple[int, int, int]]  # (header offset, data offset, data end) of each member


def samples_of(path: Path) -> list[Sample]:
    """The samples of an intact shard with the byte ranges of their members."""
    out: list[Sample] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key = m.name.split(".")[0]
            if not out or out[-1].key != key:
                out.append(Sample(key, []))
            out[-1].members.append((m.offset, m.offset_data, m.offset_data + m.size))
    return out


def make_png_shards(root: Path) -> Manifest:
    """The demo's kind of data (scikit-learn digits as 32x32 RGB PNGs), 4 shards of 8."""
    from sklearn.datasets import load_digits

    from bootmae_ds.data.demo import digit_png

    digits = load_digits()
    root.mkdir(parents=True)
    records = []
    for s in range(SHARDS):
        writer = ShardWriter(root / f"train-{s:06d}.tar")
        for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
            rel = f"digits/{digits.target[i]}/{i:04d}.png"
            writer.write(make_key(i, rel), digit_png(digits.images[i]), "png", int(digits.target[i]),
                         {"path": rel})
        records.append(writer.close())
    Manifest(records, [str(c) for c in range(10)]).write(root)
    return Manifest.read(root)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifest]:
    root = tmp_path_factory.mktemp("faults")
    jpeg = make_shards(root / "jpeg", num_classes=2, per_class=16, shard_samples=PER_SHARD,
                       size=(24, 32))
    out = {"jpeg": jpeg, "png": make_png_shards(root / "png")}
    for m in out.values():
        assert [s.count for s in m.shards] == [PER_SHARD] * SHARDS
    return out


def damage(path: Path, kind: str, rng: random.Random, member: int | None = None) -> None:
    """What the issue's fuzzer did to one shard: random byte runs overwritten, truncation at a
    random offset, or one member's 512-byte tar header overwritten."""
    data = bytearray(path.read_bytes())
    if kind == "runs":
        for _ in range(rng.randint(1, 4)):
            at, n = rng.randrange(len(data)), rng.randint(1, 64)
            data[at : at + n] = bytes(rng.randrange(256) for _ in range(len(data[at : at + n])))
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        with tarfile.open(path) as tar:
            headers = [m.offset for m in tar.getmembers()]
        at = headers[member if member is not None else rng.randrange(len(headers))]
        data[at : at + 512] = bytes(rng.randrange(256) for _ in range(512))
    path.write_bytes(bytes(data))


def expected_bad(samples: list[Sample], original: bytes, damaged: bytes) -> tuple[set[int], set[int], set[int]]:
    """Bounds on the damaged shard's unreadable positions, from byte offsets alone: (lost,
    touched, image_only: samples whose only changed bytes are image bytes, before any
    structural damage).

    ``lost``: every sample after the first structural damage (a changed tar header or the
    truncation point): nothing after it can be read. ``touched``: samples with a changed byte,
    plus all from the structurally damaged one on. A sample with changed image bytes may still
    decode, so the truth lies between the two."""
    n = min(len(original), len(damaged))
    diff = np.flatnonzero(np.frombuffer(original[:n], np.uint8) != np.frombuffer(damaged[:n], np.uint8))
    spans = [(s.members[0][0], samples[k + 1].members[0][0] if k + 1 < len(samples)
              else -(-s.members[-1][2] // 512) * 512) for k, s in enumerate(samples)]
    headers = [(h, k) for k, s in enumerate(samples) for h, _, _ in s.members]
    structural = [k for h, k in headers if np.any((diff >= h) & (diff < h + 512))]
    if len(damaged) < len(original):
        structural += [k for k, (lo, hi) in enumerate(spans) if len(damaged) < hi]
    first = min(structural, default=len(samples))
    touched = {k for k, (lo, hi) in enumerate(spans) if np.any((diff >= lo) & (diff < hi))}
    image_only = {k for k in touched if k < first and np.all(  # members[0] is the image
        (diff < spans[k][0]) | (diff >= spans[k][1])
        | ((diff >= samples[k].members[0][1]) & (diff < samples[k].members[0][2])))}
    return set(range(first + 1, len(samples))), touched | set(range(first, len(samples))), image_only


def planned_keys(counts: list[int], keys: list[list[str]], rank: int, workers: int,
                 buffer: int) -> list[list[str]]:
    """The sample keys of each micro-batch of ``rank``'s epoch 0, from the plan's functions."""
    n = plan.batches_per_rank(sum(counts), WORLD, B)
    out = []
    for g in range(n):
        w, j = g % workers, g // workers
        segments = plan.worker_segments(counts, 0, 0, rank, WORLD, w, workers, B)
        order = plan.worker_order(0, 0, rank, w, plan.worker_batches(n, workers, w) * B, buffer)
        out.append([keys[s][p] for s, p in (plan.locate(segments, q) for q in order[j * B : (j + 1) * B])])
    return out


class Hang(Exception):
    pass


@contextmanager
def watchdog(seconds: float):
    """Raise Hang in the main thread after ``seconds``; then give pytest-timeout (which uses the
    same SIGALRM) its timer back."""

    def on_alarm(*_: object) -> None:
        raise Hang

    start = time.monotonic()
    old = signal.signal(signal.SIGALRM, on_alarm)
    previous, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if previous > 0:
            signal.setitimer(signal.ITIMER_REAL, max(previous - (time.monotonic() - start), 1e-3), interval)


@dataclass
class Tally:
    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    stopped: int = 0
    with_corrupt: int = 0
    with_filled: int = 0
    decode_failures: dict[str, int] = field(default_factory=lambda: {"jpeg": 0, "png": 0})
    problems: list[str] = field(default_factory=list)


def run_case(i: int, bases: dict[str, Manifest], tmp: Path, tally: Tally, caplog) -> None:
    rng = random.Random(i)
    fmt = ("jpeg", "png")[i % 2]
    kind = ("runs", "truncate", "header")[(i // 2) % 3]
    workers, buffer = 1 + (i // 6) % 2, (1, 16)[(i // 12) % 2]  # buffer 1: no shuffle, whole batches lost
    base = bases[fmt]
    root = tmp / f"case{i}"
    shutil.copytree(base.path.parent, root)
    shard = rng.randrange(SHARDS)
    path = root / base.shards[shard].name
    original = path.read_bytes()
    member = 0 if kind == "header" and i % 4 == 0 else None  # sometimes the first header: open fails
    damage(path, kind, rng, member)
    what = f"case {i} ({fmt}, {kind} on shard {shard}, {workers} workers, buffer {buffer})"
    keys = [[s.key for s in samples_of(base.path.parent / r.name)] for r in base.shards]
    lost, touched, image_only = expected_bad(samples_of(base.path.parent / base.shards[shard].name),
                                             original, path.read_bytes())
    cfg = loader_config(root / "manifest.json", f"data.shuffle_buffer={buffer}", workers=workers, batch=B)
    epochs, stats = [], []
    caplog.clear()
    try:
        with watchdog(20), caplog.at_level("WARNING", logger="bootmae_ds.data"):
            for rank in range(WORLD):
                loader = build_train_loader(cfg, rank=rank, world_size=WORLD)
                epochs.append((len(loader), list(loader)))
                stats.append(loader.stats)
    except Hang:
        tally.hangs += 1
        tally.problems.append(f"{what}: no batch for 20 s")
        return
    except RuntimeError as err:
        if "DataLoader worker (pid" in str(err):  # a worker killed by a signal: a crashed decoder
            tally.crashes += 1
            tally.problems.append(f"{what}: {err}")
            return
        tally.stopped += 1
        tally.problems.append(f"{what}: {type(err).__name__}: {err}")
        return
    except Exception as err:  # noqa: BLE001 - anything else stopped the run
        tally.stopped += 1
        tally.problems.append(f"{what}: {type(err).__name__}: {err}")
        return
    counts = [s.count for s in base.shards]
    all_keys = {k for shard_keys in keys for k in shard_keys}
    delivered = [[k for b in batches for k in b["keys"]] for _, batches in epochs]
    planned = [planned_keys(counts, keys, r, workers, buffer) for r in range(WORLD)]
    bad = set().union(*({k for b in planned[r] for k in b} - set(delivered[r]) for r in range(WORLD)))
    bad_positions = {p for p, k in enumerate(keys[shard]) if k in bad}
    url = str(root / base.shards[shard].name)
    # Both ranks read the whole epoch: equal batch counts, full batches.
    assert [len(b) for _, b in epochs] == [n for n, _ in epochs] == [4, 4], what
    for r, (_, batches) in enumerate(epochs):
        mine = {k for b in planned[r] for k in b} & bad
        assert sum(b["corrupt"] for b in batches) == stats[r]["corrupt"] == len(mine), what
        assert stats[r]["damaged_shards"] == ([url] if mine else []), what
        for b, own in zip(batches, planned[r], strict=True):
            assert b["images"].shape == (B, 3, 32, 32) and b["masks"].shape[0] == B, what
            good = [k for k in own if k not in bad]
            assert set(b["keys"]) <= all_keys - bad, what  # never a lost sample's placeholder
            if good:  # bad ones replaced by copies of this batch's good ones
                assert set(b["keys"]) == set(good) and b["filled"] == 0, what
                assert b["corrupt"] == B - len(good), what
            else:  # nothing readable in the batch: filled from elsewhere, counted
                assert b["filled"] == b["corrupt"] == B and not set(b["keys"]) & set(own), what
                tally.with_filled += 1
    # The damage stays in the damaged shard, between the bounds the byte offsets give.
    assert bad <= set(keys[shard]), what
    assert lost <= bad_positions <= touched, f"{what}: bad {sorted(bad_positions)}, lost {lost}, touched {touched}"
    damaged_logs = [r for r in caplog.records if r.getMessage().startswith("damaged shard")]
    assert len(damaged_logs) == sum(bool(s["damaged_shards"]) for s in stats), what  # once per loader
    tally.with_corrupt += bool(bad)
    # Samples whose only damage is in their image bytes and that were unreadable: images that
    # did not decode (and did not take the worker down).
    tally.decode_failures[fmt] += len(bad_positions & image_only)


@pytest.mark.slow  # 16 s on an idle 2-core machine, 31-33 s when it is shared
def test_fuzzed_shards_never_crash_hang_or_stop_a_run(bases, tmp_path: Path, caplog) -> None:
    tally = Tally()
    start = time.monotonic()
    for i in range(CASES):
        tally.cases += 1
        run_case(i, bases, tmp_path, tally, caplog)
        shutil.rmtree(tmp_path / f"case{i}")
    seconds = time.monotonic() - start
    print(f"\nfuzz: {tally.cases} cases in {seconds:.1f} s: {tally.crashes} crashes, {tally.hangs} hangs, "
          f"{tally.stopped} stopped runs; {tally.with_corrupt} cases with corrupt samples, "
          f"{tally.with_filled} micro-batches filled from elsewhere, undecodable images "
          f"{tally.decode_failures}")
    assert (tally.crashes, tally.hangs, tally.stopped) == (0, 0, 0), "\n".join(tally.problems[:10])
    # The fuzzer reaches every path it is meant to test: lost tails, wholly lost micro-batches,
    # and damaged images of both codecs (the PNG ones are those that killed torchvision's decoder).
    assert tally.with_corrupt >= CASES // 2
    assert tally.with_filled >= 10
    assert tally.decode_failures["png"] >= 5 and tally.decode_failures["jpeg"] >= 1


def _same(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
            and torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])
            and (a["corrupt"], a["filled"], a["index"]) == (b["corrupt"], b["filled"], b["index"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_a_damaged_epoch_gives_the_same_batches(bases, tmp_path: Path, workers: int) -> None:
    """Rank 1's first shard is cut after one sample, so with no shuffle whole micro-batches are
    lost and filled from elsewhere. A loader resumed at every position yields exactly the
    uninterrupted batches, filled ones included, without reading what was consumed."""
    base = bases["jpeg"]
    root = tmp_path / "cut"
    shutil.copytree(base.path.parent, root)
    first_of_rank1 = plan.shard_order(0, 0, SHARDS)[2]  # rank 1 reads sequence [16, 32)
    name = base.shards[first_of_rank1].name
    cut = samples_of(root / name)[1].members[0][0]  # sample 1's first header: 1 sample left
    with open(root / name, "r+b") as f:
        f.truncate(cut)
    cfg = loader_config(root / "manifest.json", "data.shuffle_buffer=1", workers=workers, batch=B)
    full = list(build_train_loader(cfg, rank=1, world_size=WORLD))
    # worker 0 of 2 reads the cut shard as micro-batches 0 and 2; a single worker as 0 and 1
    assert [b["filled"] for b in full] == ([0, 0, 4, 0] if workers == 2 else [0, 4, 0, 0])
    assert sum(b["corrupt"] for b in full) == 7 and full[0]["damaged_shards"] == [str(root / name)]
    for k in range(1, len(full)):
        state = {"epoch": 0, "batches": k, "world_size": WORLD, "num_workers": workers,
                 "micro_batch_size": B, "num_samples": SHARDS * PER_SHARD, "seed": 0}
        rest = list(build_train_loader(cfg, rank=1, world_size=WORLD, state=state))
        assert len(rest) == len(full) - k
        assert all(_same(x, y) for x, y in zip(rest, full[k:], strict=True)), k


def _status(fn, data: bytes) -> str:
    """'ok', 'exception' or 'signal N': ``fn(data)`` run in a forked child, so a decoder that
    kills its process cannot take pytest with it."""
    pid = os.fork()
    if pid == 0:  # the child: exit status only, no cleanup of the parent's state
        faulthandler.disable()  # pytest's would print a traceback of every crash
        try:
            fn(data)
            os._exit(0)
        except Exception:  # noqa: BLE001
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return ("ok", "exception")[os.WEXITSTATUS(status)]


def test_damaged_pngs_that_kill_torchvision_raise_in_decode_rgb() -> None:
    from sklearn.datasets import load_digits

    from bootmae_ds.data.demo import digit_png
    from bootmae_ds.data.transforms import decode_rgb

    def torchvision_decode(data: bytes) -> None:
        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    images = load_digits().images
    rng = random.Random(0)
    killers, tried = [], 0
    while len(killers) < 3 and tried < 60:
        data = bytearray(digit_png(images[tried]))
        at = rng.randrange(40, len(data))  # past the signature and IHDR: the image data
        data[at : at + 8] = bytes(rng.randrange(256) for _ in range(8))
        tried += 1
        if _status(torchvision_decode, bytes(data)).startswith("signal"):
            killers.append(bytes(data))
        assert _status(decode_rgb, bytes(data)) in ("ok", "exception")
    if not killers:
        pytest.skip("torchvision's PNG decoder no longer crashes on damaged PNGs")
    # Pillow raises on most of them; one whose damage it tolerates (it does not check IDAT
    # CRCs) decodes to a damaged picture, which is fine: the process lives either way.
    outcomes = [_status(decode_rgb, k) for k in killers]
    assert set(outcomes) <= {"ok", "exception"} and "exception" in outcomes


def test_decode_rgb_matches_torchvision_on_good_images() -> None:
    """The reference: torchvision.io.decode_image, the loader's decoder before (on good bytes)."""
    from torchvision.io import ImageReadMode, decode_image

    from bootmae_ds.data.transforms import decode_rgb

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (4, 5, 3)).astype(np.uint8)).resize((50, 37), Image.BICUBIC)
    cases = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("L", "PNG"),
             ("P", "PNG"), ("RGBA", "PNG"), ("RGB", "WEBP"), ("RGBA", "WEBP"), ("RGB", "GIF")]
    for mode, fmt in cases:
        out = io.BytesIO()
        base.convert(mode).save(out, format=fmt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            reference = decode_image(torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8),
                                     mode=ImageReadMode.RGB)
        got = decode_rgb(out.getvalue())
        assert got.dtype == torch.uint8 and torch.equal(got, reference), (mode, fmt)
    grey16 = np.asarray(base.convert("L"), dtype=np.uint16) * 257  # 16-bit grey PNG: the high byte
    out = io.BytesIO()
    Image.fromarray(grey16).save(out, format="PNG")
    assert torch.equal(decode_rgb(out.getvalue()), torch.from_numpy(grey16 >> 8).to(torch.uint8).expand(3, -1, -1))


def test_a_size_field_claiming_gigapixels_is_refused_before_allocating() -> None:
    from bootmae_ds.data.transforms import decode_rgb

    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = (60_000).to_bytes(2, "big") * 2  # 60000 x 60000: 10.8 GB of RGB
    start = time.perf_counter()
    with pytest.raises(Exception, match="exceeds limit"):  # Pillow's DecompressionBomb*
        decode_rgb(bytes(data))
    assert time.perf_counter() - start < 1.0
