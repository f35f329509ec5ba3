#!/usr/bin/env bash
# On a CPU machine with PyPI access: put into .whl/ (git-ignored) the Python 3.12 wheels that the
# lent GPU machine lacks (deepspeed, webdataset, pydantic and what they need that it does not
# have), one version each: the versions installed here, so the device runs what the tests ran.
#   bash bench/device/prepare.sh        # then: the device tool's run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.whl
rm -rf "$out" && mkdir -p "$out"
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
# deepspeed is published as a source archive; without its C++ ops it builds a pure py3-none-any wheel
DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -q -w "$out" "deepspeed==$(version deepspeed)"
pure=(webdataset pydantic annotated-types typing-inspection hjson braceexpand)
binary=(pydantic-core)
specs=()
for name in "${pure[@]}" "${binary[@]}"; do specs+=("$name==$(version "$name")"); done
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" "${specs[@]}"
ls -l "$out"
du -sh "$out"
