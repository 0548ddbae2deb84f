#!/usr/bin/env bash
# Build llama-cpp-python (the local LLM tier's server) once as a portable wheel and install it into a venv.
#
#   scripts/build_llama_cpp.sh [VENV]        # default VENV: .venv   (`make install` runs this)
#
# llama-cpp-python is an sdist; built as pip builds it, llama.cpp compiles for the building CPU (GGML_NATIVE),
# and pip caches that wheel for every later venv on the machine. On 2026-12-02 such a build on an Intel Xeon VM
# (AVX-512 and AMX reported) segfaulted on its first completion (exit -11; the cold `make crowdflower` stopped at
# "tier2: no calibration pair could be graded"), and a wheel cached on one host can land on another CPU.
# This builds without GGML_NATIVE, for AVX2/FMA/F16C x86_64 (on other machines: the compiler's defaults), into
#
#   ${ANNOMINE_WHEEL_CACHE:-~/.cache/annomine/wheels}/llama-cpp-python-0.3.36-portable-<python>-<machine>/
#
# and installs it with its server extras. About 10 minutes on 2 cores the first time (measured 2026-12-02); a second
# run finds the wheel.
set -euo pipefail

VENV=${1:-${VENV:-.venv}}
PY="$VENV/bin/python"
VERSION=0.3.36
[ -x "$PY" ] || { echo "build_llama_cpp: no Python at $PY" >&2; exit 2; }
py_tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
machine=$(uname -m)
cache="${ANNOMINE_WHEEL_CACHE:-$HOME/.cache/annomine/wheels}/llama-cpp-python-$VERSION-portable-$py_tag-$machine"

if ! ls "$cache"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "build_llama_cpp: building llama-cpp-python $VERSION (portable) into $cache (about 10 minutes)"
    flags="-DGGML_NATIVE=OFF"
    [ "$machine" = x86_64 ] && flags="$flags -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    CMAKE_ARGS="$flags" "$VENV/bin/pip" wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$tmp"
    mkdir -p "$cache"
    mv "$tmp"/llama_cpp_python-"$VERSION"-*.whl "$cache"/
fi
# --force-reinstall of the package alone: replaces a native build pip installed earlier in this venv
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$cache"/llama_cpp_python-"$VERSION"-*.whl
"$VENV/bin/pip" install -q --find-links "$cache" "llama-cpp-python[server]==$VERSION"
