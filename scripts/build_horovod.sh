#!/usr/bin/env bash
# Build Horovod 0.28.1 once (CPU: gloo, PyTorch only) and install it into a virtual environment.
#
#   scripts/build_horovod.sh [VENV]          # default VENV: .venv   (`make horovod` runs this)
#
# Horovod 0.28.1 is an sdist only and does not build as-is against torch 2.x headers
# ("#error C++17 or later compatible compiler is required"): its CMakeLists ask for C++14. This script
# downloads the sdist, forces C++17, and builds a wheel with --no-build-isolation (the build needs the
# venv's own torch) into a wheel cache keyed by the Horovod, torch and Python versions:
#
#   ${ANNOMINE_WHEEL_CACHE:-~/.cache/annomine/wheels}/horovod-0.28.1-torch<version>/horovod-0.28.1-cp311-...whl
#
# The build takes about 10 minutes on 2 cores; a second run (a fresh venv, a later CI run with the same
# cache) finds the wheel and only installs it (seconds). With the wheel already installed, it does nothing.
# GPU clusters: set HOROVOD_GPU_OPERATIONS=NCCL (and CUDA in the environment) to build the NCCL flavour;
# the cache folder then says "nccl".
set -euo pipefail

VENV=${1:-${VENV:-.venv}}
PY="$VENV/bin/python"
HOROVOD_VERSION=0.28.1
[ -x "$PY" ] || { echo "build_horovod: no Python at $PY (make install first)" >&2; exit 2; }
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"

torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
py_tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
flavour=gloo
[ -n "${HOROVOD_GPU_OPERATIONS:-}" ] && flavour=$(echo "$HOROVOD_GPU_OPERATIONS" | tr '[:upper:]' '[:lower:]')
cache="${ANNOMINE_WHEEL_CACHE:-$HOME/.cache/annomine/wheels}/horovod-$HOROVOD_VERSION-torch$torch_version-$flavour"

# Already installed against this torch: nothing to do.
if "$PY" - "$HOROVOD_VERSION" <<'EOF' 2>/dev/null
import sys
import horovod, horovod.torch  # noqa: E401 - the extension must load against the installed torch
sys.exit(0 if horovod.__version__.split("+")[0] == sys.argv[1] else 1)
EOF
then
    echo "build_horovod: horovod $HOROVOD_VERSION already installed in $VENV"
    exit 0
fi

# Horovod's own runtime dependencies (and what its setup.py imports while building).
"$VENV/bin/pip" install -q cloudpickle psutil pyyaml packaging 'cffi>=1.4.0'

wheel=$(ls "$cache"/horovod-"$HOROVOD_VERSION"-"$py_tag"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "build_horovod: building horovod $HOROVOD_VERSION against torch $torch_version ($flavour) in $work"
    start=$(date +%s)
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers need C++17; Horovod 0.28.1 sets 14 at the top level and for its torch extension.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    if grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; then
        echo "build_horovod: could not force C++17 in Horovod's CMakeLists" >&2
        exit 1
    fi
    (
        cd "$src"
        export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
               HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"
        "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps -w "$work/dist" . 2>&1 | tail -n 20
    ) || { echo "build_horovod: the build failed" >&2; exit 1; }
    built=$(ls "$work"/dist/horovod-*.whl)
    mkdir -p "$cache"
    cp "$built" "$cache/.partial.whl" && mv "$cache/.partial.whl" "$cache/$(basename "$built")"  # never a half-written wheel
    wheel="$cache/$(basename "$built")"
    echo "build_horovod: built $(basename "$wheel") in $(( $(date +%s) - start )) s; cached in $cache"
fi
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$wheel"
"$PY" -c 'import horovod.torch as hvd; print("build_horovod: horovod", __import__("horovod").__version__, "gloo built:", hvd.gloo_built())'
