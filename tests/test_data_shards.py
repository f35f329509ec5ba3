"""Shard builder and verifier: tar layout, manifest, restart, skipped files, bad shards."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from data_helpers import member_offsets
from PIL import Image

from bootmae_ds.data.builder import BuildError, BuildOptions, build_shards
from bootmae_ds.data.shards import Manifest, verify_shard
from bootmae_ds.data.sources import write_synthetic_folder

ROOT = Path(__file__).resolve().parents[1]


def _build(src: Path, out: Path, **kw) -> Manifest:
    opts = BuildOptions(**({"shard_samples": 10, "workers": 1} | kw))
    return build_shards(src, out, opts, progress=False, log=lambda m: None)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """3 classes x 14 JPEGs, plus a text file, a broken JPEG and a stray top-level file."""
    src = tmp_path / "src"
    write_synthetic_folder(src, 3, 14, size=(30, 40))
    (src / "class_1" / "notes.txt").write_text("not an image")
    (src / "class_2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "README").write_text("stray")
    return src


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tar_layout_and_manifest(tree: Path, tmp_path: Path) -> None:
    m = _build(tree, tmp_path / "out")
    out = tmp_path / "out"
    assert [s.name for s in m.shards] == [f"train-{i:06d}.tar" for i in range(5)]
    # 44 files planned 10 per shard (10, 10, 10, 10, 4); the 2 bad ones are left out.
    assert sum(s.count for s in m.shards) == 42 and all(s.count <= 10 for s in m.shards)
    assert m.shards[3].count == 10 and 2 <= m.shards[4].count <= 4
    data = json.loads((out / "manifest.json").read_text())
    assert data["total_samples"] == 42 and data["num_shards"] == 5
    assert data["total_bytes"] == sum((out / s.name).stat().st_size for s in m.shards)
    for s in data["shards"]:
        assert (
            s["sha256"] == _sha(out / s["name"]) and s["bytes"] == (out / s["name"]).stat().st_size
        )
    assert json.loads((out / "classes.json").read_text()) == ["class_0", "class_1", "class_2"]
    assert data["skipped"][:2] == [
        {"path": "README", "reason": "not inside a class folder"},
        {"path": "class_1/notes.txt", "reason": "not an image"},
    ]
    assert data["skipped"][2]["path"] == "class_2/broken.jpg"
    assert data["skipped"][2]["reason"].startswith("unreadable image header")
    keys, seen_paths = [], set()
    for s in m.shards:
        with tarfile.open(out / s.name) as tar:
            names = tar.getnames()
            assert len(names) == 3 * s.count
            for i in range(0, len(names), 3):
                key = names[i].split(".")[0]
                assert names[i : i + 3] == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
                assert "." not in key  # a dot would merge samples in webdataset
                meta = json.loads(tar.extractfile(names[i + 2]).read())
                image = tar.extractfile(names[i]).read()
                assert image == (tree / meta["path"]).read_bytes()  # bytes copied, not re-encoded
                label = int(tar.extractfile(names[i + 1]).read())
                assert meta["class"] == f"class_{label}" == meta["path"].split("/")[0]
                keys.append(key)
                seen_paths.add(meta["path"])
    assert len(set(keys)) == 42 and len(seen_paths) == 42
    assert keys != sorted(keys, key=lambda k: k.split("_", 1)[1])  # file order was shuffled


def test_restart_keeps_complete_shards_and_rebuilds_the_rest(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _build(tree, out)
    before = {
        s.name: ((out / s.name).stat().st_ino, (out / s.name).stat().st_mtime_ns)
        for s in first.shards
    }
    # Simulate a run killed mid-way: no manifest yet, shard 1 never written, shard 3 renamed
    # into place but not yet recorded, and a partial temporary file of shard 4.
    (out / "manifest.json").unlink()
    (out / "train-000001.tar").unlink()
    (out / ".build" / "train-000003.tar.json").unlink()
    (out / ".train-000004.tar.tmp-999").write_bytes(b"partial")
    messages: list[str] = []
    again = build_shards(
        tree, out, BuildOptions(shard_samples=10, workers=1), progress=False, log=messages.append
    )
    assert [s.public() for s in again.shards] == [s.public() for s in first.shards]  # same bytes
    for name in ("train-000000.tar", "train-000002.tar", "train-000004.tar"):
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == before[name]  # complete shards were not rewritten
    assert (out / "train-000001.tar").stat().st_ino != before["train-000003.tar"][0]
    assert any("train-000003.tar" in m and "never recorded" in m for m in messages)
    assert any("keeping 3 complete shards, building 2" in m for m in messages)
    assert not list(out.glob(".*.tmp-*"))
    assert again.skipped == first.skipped


@pytest.mark.slow
def test_restart_after_a_real_kill(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_synthetic_folder(src, 4, 40, size=(300, 400))
    # --max-side makes the build decode and re-encode, slow enough to kill it mid-way.
    cmd = [
        sys.executable,
        "data_prep/build_shards.py",
        str(src),
        str(out),
        "--shard-samples",
        "8",
        "--workers",
        "1",
        "--max-side",
        "200",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob(".build/*.tar.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not (out / "manifest.json").exists()  # it really was interrupted
    recorded = {
        p.name[:-5]: (out / p.name[:-5]).stat().st_ino for p in out.glob(".build/*.tar.json")
    }
    assert 3 <= len(recorded) < 20
    run = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"keeping {len(recorded)} complete shards, building {20 - len(recorded)}" in run.stderr
    assert all((out / name).stat().st_ino == ino for name, ino in recorded.items())
    fresh = _build(src, tmp_path / "fresh", shard_samples=8, max_side=200)
    assert [s.sha256 for s in Manifest.read(out).shards] == [s.sha256 for s in fresh.shards]
    assert not list(out.glob(".*.tmp-*"))


def test_existing_outputs_are_never_overwritten_silently(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = _build(tree, out)
    with open(out / "train-000002.tar", "r+b") as f:  # damage a recorded, complete shard
        f.seek(700)
        f.write(b"XX")
    with pytest.raises(BuildError, match=r"(?s)train-000002\.tar.*--overwrite"):
        _build(tree, out)
    with pytest.raises(BuildError, match="different source or options"):
        _build(tree, out, shard_samples=7)
    rebuilt = build_shards(
        tree,
        out,
        BuildOptions(shard_samples=10, workers=1),
        overwrite=True,
        progress=False,
        log=lambda x: None,
    )
    assert _sha(out / "train-000002.tar") == m.shards[2].sha256 == rebuilt.shards[2].sha256
    other = tmp_path / "foreign"
    other.mkdir()
    (other / "train-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(BuildError, match="did not record"):
        _build(tree, other)


def test_parallel_build_equals_serial_build(tree: Path, tmp_path: Path) -> None:
    serial = _build(tree, tmp_path / "a")
    parallel = _build(tree, tmp_path / "b", workers=2)
    assert [s.sha256 for s in serial.shards] == [s.sha256 for s in parallel.shards]


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BuildError, match="is empty"):
        _build(empty, tmp_path / "o1")
    (empty / "a").mkdir()
    with pytest.raises(BuildError, match="no files inside its class folders"):
        _build(empty, tmp_path / "o2")
    flat = tmp_path / "flat"
    write_synthetic_folder(flat, 1, 3)
    for p in (flat / "class_0").iterdir():
        p.rename(flat / p.name)
    (flat / "class_0").rmdir()
    with pytest.raises(BuildError, match="unknown layout.*--labels"):
        _build(flat, tmp_path / "o3")
    with pytest.raises(BuildError, match="not a directory"):
        _build(tmp_path / "nope", tmp_path / "o4")


def test_flat_validation_layout_with_labels(tmp_path: Path) -> None:
    src = tmp_path / "val"
    write_synthetic_folder(src, 1, 5)
    for p in sorted((src / "class_0").iterdir()):
        p.rename(src / p.name)
    (src / "class_0").rmdir()
    (tmp_path / "classes.json").write_text(json.dumps(["n01", "n02", "n03"]))
    labels = {
        "img_00000.jpg": "n03",
        "img_00001.jpg": "n01",
        "img_00002.jpg": "n02",
        "img_00003.jpg": "n01",
    }
    (tmp_path / "labels.txt").write_text("".join(f"{f} {c}\n" for f, c in labels.items()))
    m = _build(
        src,
        tmp_path / "out",
        prefix="val",
        labels=str(tmp_path / "labels.txt"),
        classes=str(tmp_path / "classes.json"),
    )
    assert m.classes == ["n01", "n02", "n03"] and m.total_samples == 4
    assert m.skipped == [
        {"path": "img_00004.jpg", "reason": f"no label in {tmp_path / 'labels.txt'}"}
    ]
    with tarfile.open(tmp_path / "out" / "val-000000.tar") as tar:
        got = {
            json.loads(tar.extractfile(n).read())["path"]: int(
                tar.extractfile(n[:-4] + "cls").read()
            )
            for n in tar.getnames()
            if n.endswith(".json")
        }
    assert got == {f: ["n01", "n02", "n03"].index(c) for f, c in labels.items()}


def test_max_side_reencodes_large_images_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_synthetic_folder(src, 1, 2, size=(60, 90))
    small = src / "class_0" / "small.png"
    Image.new("RGB", (20, 10), "red").save(small)
    m = _build(src, tmp_path / "out", max_side=45)
    with tarfile.open(tmp_path / "out" / m.shards[0].name) as tar:
        for n in tar.getnames():
            if n.endswith((".jpg", ".png")):
                img = Image.open(tar.extractfile(n))
                assert max(img.size) <= 45
                if n.endswith(".jpg"):
                    assert img.size == (45, 30)
                else:
                    assert tar.extractfile(n).read() == small.read_bytes()  # small: copied


def test_verify_shards_names_truncated_and_modified_shards(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = _build(tree, out)
    # Truncated exactly at a header boundary: still a valid tar, just one sample short.
    members = member_offsets(out / "train-000001.tar")
    with open(out / "train-000001.tar", "r+b") as f:
        f.truncate(members[-3][1])
    with tarfile.open(out / "train-000001.tar") as tar:  # tarfile reads it without complaint
        assert len(tar.getnames()) == len(members) - 3
    # Modified: bytes flipped inside an image, size unchanged.
    with open(out / "train-000003.tar", "r+b") as f:
        f.seek(member_offsets(out / "train-000003.tar")[0][2] + 200)
        f.write(b"\x00" * 300)
    problems = verify_shard(out / "train-000001.tar", m.shards[1])
    assert problems and "bytes on disk" in problems[0]
    run = subprocess.run(
        [sys.executable, "data_prep/verify_shards.py", str(out), "--workers", "2"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "BAD train-000001.tar" in run.stderr and "BAD train-000003.tar" in run.stderr
    assert "sha256" in run.stderr
    assert "3/5 shards good; bad: train-000001.tar, train-000003.tar" in run.stdout


def test_build_cli_reports_and_verifies(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "data_prep/build_shards.py",
        str(tree),
        str(out),
        "--shard-bytes",
        "20KB",
        "--workers",
        "2",
        "--no-progress",
    ]
    run = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["samples"] == 42 and info["skipped"] == 3 and info["shards"] > 5
    assert "skipped class_2/broken.jpg: unreadable image header" in run.stderr
    ok = subprocess.run(
        [sys.executable, "data_prep/verify_shards.py", str(out)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and f"{info['shards']}/{info['shards']} shards good" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "data_prep/build_shards.py", str(tmp_path / "none"), str(out)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a directory" in bad.stderr
