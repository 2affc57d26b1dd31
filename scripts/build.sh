#!/bin/sh
# scripts/build.sh: configure (once) and build in ./build; CUDA is built when nvcc exists.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ -x configure ] || ./autogen.sh >/dev/null
mkdir -p build
cd build
if [ ! -f Makefile ]; then
    cuda=
    if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then cuda="--with-cuda=${CUDA_HOME:-/usr/local/cuda}"; fi
    ../configure $cuda ${DS_CONFIGURE_FLAGS:-} >/dev/null
fi
make -j"$(nproc)" >/dev/null
echo "build: ok ($top/build)"
