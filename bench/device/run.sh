#!/usr/bin/env bash
# The one-call GPU run (see bench/device/run.py for its parts). On the lent machine:
#   bash bench/device/run.sh [--budget-s 360]        # with the device tool: carry [".whl"]; OUT is set there
#   bash bench/device/run.sh --smoke                  # the same run, tiny, on a CPU (the rehearsal)
# The wheels of .whl/ (bench/device/prepare.sh; BOOTMAE_DEVICE_WHEELS names another folder) are
# installed first, into a private target put first on PYTHONPATH, exactly as on the device, in a
# smoke run too. The time budget counts from here, the install included.
set -euo pipefail
export BOOTMAE_DEVICE_T0=${BOOTMAE_DEVICE_T0:-$(date +%s.%N)}
cd "$(dirname "$0")/../.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
wheels=${BOOTMAE_DEVICE_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  deps=${BOOTMAE_DEVICE_DEPS:-/tmp/bootmae_device_deps}
  rm -rf "$deps"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$deps" "$wheels"/*.whl; then
    version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "error: the wheels in $wheels do not install on this Python ($version); make a set for it with" \
         "'bash bench/device/prepare.sh --python $version --out DIR' and point BOOTMAE_DEVICE_WHEELS at DIR" >&2
    exit 2
  fi
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" PATH="$deps/bin:$PATH"
  # JIT-built ops (DeepSpeed's CPU op in a smoke run) of the carried packages apart from those of an
  # installed copy: each would rebuild the other's, their include paths differ
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${deps}_extensions}
  echo "[device] installed $(ls "$wheels"/*.whl | wc -l) wheels into $deps in $("$PY" -c "import time; print(round(time.time() - $BOOTMAE_DEVICE_T0, 1))") s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/device/run.py --out "$OUT" "$@"
