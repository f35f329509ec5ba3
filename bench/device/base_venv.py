"""A virtual environment that holds only what the lent GPU machine has: Python, torch, torchvision,
timm, numpy, pytest and what they require (the *base set* of ``wheels.py``), linked from this
machine's installation, nothing else. The device rehearsal runs ``run.sh --smoke`` in it with the
carried wheels, so that an import the wheels lack fails here, not on the device.

    python bench/device/base_venv.py /tmp/device_venv     # then PATH=/tmp/device_venv/bin:$PATH

The packages are symbolic links to this machine's installed copies (no download, seconds to make):
each distribution's top-level entries (packages, modules, its .dist-info) from its RECORD.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from wheels import BASE, closure, marker_env


def site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def top_level(dist: md.Distribution) -> set[str]:
    """The entries a distribution put into site-packages (scripts and data elsewhere left out)."""
    return {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}


def make(venv: Path) -> list[str]:
    """Create ``venv`` (with pip, which the device's Python has) and link the base set into it."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = site_packages(venv)
    here = Path(sysconfig.get_paths()["purelib"])
    names = sorted(closure(list(BASE), marker_env(f"{sys.version_info.major}.{sys.version_info.minor}")))
    for name in names:
        dist = md.distribution(name)
        source = Path(dist.locate_file(""))
        for entry in sorted(top_level(dist)):
            target = site / entry
            if target.exists() or target.is_symlink() or entry.endswith(".pth"):
                continue  # the venv's own pip/setuptools; .pth hooks of the host's tools
            if not (source / entry).exists():
                raise SystemExit(f"{name}: {source / entry} is in its RECORD but not on disk")
            target.symlink_to(source / entry)
    if here != site:
        check = "import torch, torchvision, timm, numpy, pytest"
        subprocess.run([str(venv / "bin" / "python"), "-c", check], check=True)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path)
    a = parser.parse_args()
    names = make(a.venv)
    print(f"{a.venv}: {len(names)} distributions linked: {' '.join(names)}")


if __name__ == "__main__":
    main()
