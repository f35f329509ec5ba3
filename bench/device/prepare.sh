#!/usr/bin/env bash
# On a CPU machine with PyPI access: put into .whl/ (git-ignored) the wheels of every package the
# device run needs that the lent GPU machine lacks, for its Python, one version each (the versions
# installed here, so the device runs what the tests ran). The list is derived from the installed
# packages' metadata by bench/device/wheels.py (its docstring says how).
#   bash bench/device/prepare.sh                     # Python 3.12, the device's; then the device
#                                                    # tool's run of bench/device/run.sh, carry [".whl"]
#   bash bench/device/prepare.sh --python 3.11 --out /tmp/whl   # another Python (the CPU rehearsal)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=3.12
out=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: prepare.sh [--python X.Y] [--out DIR]" >&2; exit 2 ;;
  esac
done
rm -rf "$out" && mkdir -p "$out"
python3 bench/device/wheels.py --python "$python" --out "$out" 2> >(grep -v "is ignored: it is neither" >&2)
ls -l "$out"
du -sh "$out"
