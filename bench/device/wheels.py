"""Which packages the lent GPU machine lacks for the device run, and their wheels for its Python.

The device machine has Python, torch, torchvision, timm, numpy, pytest, opencv-python-headless and
what they require (the *base set*), and no package registry. Everything else the run imports travels as wheels in
``.whl/``. The list is derived, not written by hand, from the metadata of the packages installed
here (the versions the tests ran):

1. roots: the project's dependencies (``pyproject.toml``) and pytest-timeout (``--timeout``),
   less what the device run never imports (:data:`NOT_ON_DEVICE`);
2. their requirement closure, markers evaluated for the target Python on Linux x86-64;
3. less the base set (the closure of :data:`BASE`), except a base-set package that a carried
   package asks for with a version bound: the device's copy may be older (pydantic-core needs
   typing-extensions >= 4.14.1, torch only >= 4.10), so it travels too. The five named base
   packages are exempt: their versions there are known.

    python bench/device/wheels.py --list [--python 3.12]          # name==version per line
    python bench/device/wheels.py --python 3.12 --out .whl         # download / build the wheels
    python bench/device/wheels.py --check .whl [--python 3.12]     # every wheel installs on that Python?

A set made for another Python is refused by its tags (:func:`mismatched`, ``packaging.tags``):
after the download here, and by ``run.sh`` on the device before it installs anything.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
# opencv-python-headless (segmentation's resize) is in the device image too (device/KINDS.md's package
# list, read 2026-11-17): its wheel alone is 64 MB, the whole of what a device call may carry.
BASE = ("torch", "torchvision", "timm", "numpy", "pytest", "opencv-python-headless")
# The working tree, wheels included, travels to the device within 64 MiB (device/README.md, Limits).
MAX_WHEEL_BYTES = 32 * 2**20
# Dependencies of the project that the device run does not import: trackers are off there, and the
# bundled demo data (scikit-learn's digits) is not used.
NOT_ON_DEVICE = {"tensorboard", "scikit-learn"}
EXTRA_ROOTS = ("pytest-timeout",)
# Published as source archives only: built here into a wheel (DeepSpeed without its C++ ops).
SOURCE_ONLY = {"deepspeed"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def supported_tags(python: str) -> set[Tag]:
    """The wheel tags CPython ``python`` (X.Y) installs on Linux x86-64 (manylinux up to glibc 2.28,
    what :data:`PLATFORMS` downloads for): its own ABI, abi3 of it and older, pure Python."""
    version = tuple(int(x) for x in python.split("."))
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)] + [
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return set(cpython_tags(version, platforms=platforms)) | set(
        compatible_tags(version, interpreter=f"cp{version[0]}{version[1]}", platforms=platforms))


def mismatched(wheels: list[Path], python: str) -> list[str]:
    """The wheels among ``wheels`` that CPython ``python`` cannot install, each with its tags."""
    ok = supported_tags(python)
    bad = []
    for wheel in wheels:
        try:
            tags = parse_wheel_filename(wheel.name)[3]
        except InvalidWheelFilename as err:
            bad.append(f"{wheel.name} ({err})")
            continue
        if not tags & ok:
            bad.append(f"{wheel.name} (tags {','.join(sorted(map(str, tags)))})")
    return bad


def check(folder: Path, python: str) -> None:
    """Refuse a wheel set that is not for ``python``, or too large to travel with the working tree,
    naming the wheels and what to do."""
    wheels = sorted(folder.glob("*.whl"))
    if bad := mismatched(wheels, python):
        raise SystemExit(f"error: {len(bad)} wheel(s) in {folder} are not for Python {python}: {'; '.join(bad)}. "
                         f"Make the set for it: bash bench/device/prepare.sh --python {python} --out DIR")
    sizes = {w.name: w.stat().st_size for w in wheels}
    if sum(sizes.values()) > MAX_WHEEL_BYTES:
        largest = ", ".join(f"{n} ({b / 2**20:.1f} MiB)" for n, b in sorted(sizes.items(), key=lambda x: -x[1])[:3])
        raise SystemExit(f"error: the wheels in {folder} take {sum(sizes.values()) / 2**20:.1f} MiB, over the "
                         f"{MAX_WHEEL_BYTES / 2**20:.0f} MiB they may take of the device call's 64 MiB (largest: "
                         f"{largest}). A package the device image already has belongs in wheels.BASE.")


def marker_env(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython")
    return env


def requirements(name: str, env: dict[str, str]) -> list[Requirement]:
    """The installed ``name``'s requirements that apply in ``env`` (extras left out)."""
    out = []
    for text in md.distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env | {"extra": ""}):
            out.append(req)
    return out


def closure(roots: list[str], env: dict[str, str]) -> dict[str, list[Requirement]]:
    """Every package reachable from ``roots`` -> the requirements it states."""
    seen: dict[str, list[Requirement]] = {}
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = requirements(name, env)
        todo += [canonicalize_name(r.name) for r in seen[name]]
    return seen


def project_roots() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [canonicalize_name(Requirement(d).name) for d in deps]
    return [n for n in names if n not in NOT_ON_DEVICE] + list(EXTRA_ROOTS)


def carried(python: str) -> dict[str, str]:
    """name -> installed version of every package to carry, for the target ``python``."""
    env = marker_env(python)
    base = set(closure(list(BASE), env))
    graph = closure(project_roots(), env)
    carry = {n for n in graph if n not in base}
    named = {canonicalize_name(b) for b in BASE}
    changed = True
    while changed:  # a bounded requirement of a carried package pulls a base package in
        changed = False
        for name in list(carry):
            for req in graph[name]:
                dep = canonicalize_name(req.name)
                if req.specifier and dep in base and dep not in named and dep not in carry:
                    carry.add(dep)
                    graph.setdefault(dep, requirements(dep, env))
                    changed = True
    return {n: md.version(n) for n in sorted(carry)}


def fetch(wheels: dict[str, str], python: str, out: Path) -> None:
    """Download (or build) one wheel per package into ``out`` for CPython ``python``."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    built = [f"{n}=={v}" for n, v in wheels.items() if n in SOURCE_ONLY]
    binary = [f"{n}=={v}" for n, v in wheels.items() if n not in SOURCE_ONLY]
    if built:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), *built],
                       check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
                    "--implementation", "cp", *platforms, "-d", str(out), *binary], check=True)
    names = sorted(canonicalize_name(re.split(r"-\d", w.name, maxsplit=1)[0]) for w in out.glob("*.whl"))
    if names != sorted(wheels):
        raise SystemExit(f"{out} holds wheels of {names}, expected {sorted(wheels)}")
    check(out, python)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=None,
                        help="the device's Python (X.Y; default 3.12, with --check this interpreter's)")
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument("--list", action="store_true", help="print the packages, fetch nothing")
    parser.add_argument("--check", type=Path, default=None, metavar="DIR",
                        help="only check that every wheel in DIR installs on the Python")
    a = parser.parse_args()
    if a.check:
        check(a.check, a.python or f"{sys.version_info.major}.{sys.version_info.minor}")
        return 0
    a.python = a.python or "3.12"
    wheels = carried(a.python)
    if a.list:
        print("\n".join(f"{n}=={v}" for n, v in wheels.items()))
        return 0
    fetch(wheels, a.python, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
