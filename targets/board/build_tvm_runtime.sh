#!/usr/bin/env bash
# Build the Apache TVM 0.27 *runtime* (not the compiler: no LLVM), its CUDA runtime and the C++ RPC server
# (tvm_rpc) ON a Jetson board, plus Python 3.10 and TVM's Python package in runtime-only mode.
#
#   !!! UNTESTED ON A BOARD !!!  Written from TVM's sources and NVIDIA's documentation; read it before running.
#
# Only the CUDA runtime must come from here: the CPU runtime, TVM's Python package and its RPC server are on PyPI
# as aarch64 wheels (apache-tvm 0.27.0.post1, manylinux_2_27) and were run in the emulated board
# (`python -m compiler board --emulate setup`); see README.md beside this script for that recipe and for which
# steps are proven here. The wheel's own libtvm_runtime_cuda.so needs CUDA 13 (libcudart.so.13), not JetPack's 10.2.
#
# Why: TVM 0.27's CUDA runtime calls cuLaunchKernelEx (CUDA 12) and its Python package needs Python >= 3.10,
# while JetPack 4.6 (TX2, Nano, Xavier) has CUDA 10.2 and Python 3.6. tvm-0.27-cuda10.patch (beside this
# script) makes cuda_module.cc launch with cuLaunchKernel when built against CUDA < 12; cuTensorMapEncodeTiled
# is already compiled only for CUDA >= 12 in 0.27.
#
# Usage (on the board, as a normal user; ~1 h on a TX2, ~4 GB of disk):
#   bash build_tvm_runtime.sh
#   source ~/tvm-runtime/env.sh && python -c "import tvm; print(tvm.cuda(0).exist)"
#
# Settings (environment):
#   PREFIX=~/tvm-runtime     where everything goes (venv, lib, bin, python, env.sh)
#   TVM_SRC=                 an unpacked apache-tvm 0.27 source release (with 3rdparty/ filled); else fetched:
#   TVM_VERSION=0.27.0       TVM_URL= the source release tarball (Apache's release archive) or TVM_GIT=1 to clone
#   CUDA_HOME=/usr/local/cuda
#   CUDA_ARCH=auto           62 TX2, 53 Nano, 72 Xavier, 87 Orin (auto: from the board's model name)
#   PATCH=auto               auto: apply the patch when the CUDA toolkit is older than 12; 0 / 1 to force
#   PYTHON_MODE=uv           uv: a prebuilt CPython 3.10 through uv; source: build CPython 3.10 from source
#   CXX=                     a C++20 compiler (TVM 0.27 builds with -std=c++20): g++ >= 10; JetPack 4.6's g++ 7
#                            is too old (install g++-10 or newer with the board's package manager first)
#   JOBS=$(nproc)            lower it (JOBS=2) if the board runs out of memory while compiling
set -euo pipefail

PREFIX=${PREFIX:-$HOME/tvm-runtime}
TVM_VERSION=${TVM_VERSION:-0.27.0}
TVM_URL=${TVM_URL:-https://archive.apache.org/dist/tvm/tvm-v${TVM_VERSION}/apache-tvm-src-v${TVM_VERSION}.tar.gz}
TVM_GIT=${TVM_GIT:-0}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
CUDA_ARCH=${CUDA_ARCH:-auto}
PATCH=${PATCH:-auto}
PYTHON_MODE=${PYTHON_MODE:-uv}
PYTHON_SRC_VERSION=${PYTHON_SRC_VERSION:-3.10.16}
JOBS=${JOBS:-$(nproc)}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH_FILE=$HERE/tvm-0.27-cuda10.patch
WORK=$PREFIX/work
VENV=$PREFIX/venv

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(uname -m)" = aarch64 ] || die "run this on the board (aarch64), not on $(uname -m)"
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
mkdir -p "$PREFIX" "$WORK"

# ---- facts about the board -----------------------------------------------------------------------------------
CUDA_VER=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
CUDA_MAJOR=${CUDA_VER%%.*}
if [ "$CUDA_ARCH" = auto ]; then
  model=$(tr -d '\0' </proc/device-tree/model 2>/dev/null || true)
  case "$model" in
    *TX2*) CUDA_ARCH=62 ;; *Nano*|*TX1*) CUDA_ARCH=53 ;; *Xavier*) CUDA_ARCH=72 ;; *Orin*) CUDA_ARCH=87 ;;
    *) die "cannot tell the GPU from '$model': set CUDA_ARCH (62 TX2, 53 Nano, 72 Xavier, 87 Orin)" ;;
  esac
fi
if [ -z "${CXX:-}" ]; then
  for c in g++-13 g++-12 g++-11 g++-10 g++; do
    if command -v "$c" >/dev/null && [ "$("$c" -dumpversion | cut -d. -f1)" -ge 10 ]; then CXX=$(command -v "$c"); break; fi
  done
fi
[ -n "${CXX:-}" ] || die "TVM 0.27 needs a C++20 compiler (g++ >= 10); JetPack 4.6 ships g++ 7: install g++-10 or newer"
CC=${CC:-${CXX/g++/gcc}}
# nvcc only accepts the host compilers of its time (CUDA 10.2: g++ <= 8): keep the system one for .cu files
CUDA_HOST_CXX=${CUDA_HOST_CXX:-/usr/bin/g++}
say "board: CUDA $CUDA_VER, sm_$CUDA_ARCH; C++: $CXX; nvcc host compiler: $CUDA_HOST_CXX; prefix: $PREFIX"

# ---- Python 3.10 ---------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$PYTHON_MODE" = uv ]; then
    say "Python 3.10 through uv (a prebuilt CPython for glibc >= 2.17)"
    python3 -m pip install --user --upgrade "pip<22" >/dev/null   # JetPack 4.6's pip 9 cannot read manylinux2014
    python3 -m pip install --user uv
    "$HOME/.local/bin/uv" python install 3.10
    "$HOME/.local/bin/uv" venv --seed --python 3.10 "$VENV"
  else
    say "Python $PYTHON_SRC_VERSION from source (needs libssl, libffi, zlib, bz2, sqlite3, readline dev headers)"
    cd "$WORK"
    [ -f "Python-$PYTHON_SRC_VERSION.tgz" ] || \
      wget -q "https://www.python.org/ftp/python/$PYTHON_SRC_VERSION/Python-$PYTHON_SRC_VERSION.tgz"
    rm -rf "Python-$PYTHON_SRC_VERSION" && tar xzf "Python-$PYTHON_SRC_VERSION.tgz"
    (cd "Python-$PYTHON_SRC_VERSION" && ./configure --prefix="$PREFIX/python3.10" --with-ensurepip=install \
       >/dev/null && make -j"$JOBS" >/dev/null && make install >/dev/null)
    "$PREFIX/python3.10/bin/python3.10" -m venv "$VENV"
  fi
fi
PY=$VENV/bin/python
"$PY" -m pip install --upgrade pip >/dev/null
# numpy < 2.3: the last wheels for manylinux2014 aarch64 (glibc 2.17); cmake >= 3.24 for TVM's CMakeLists
"$PY" -m pip install "numpy<2.3" "cmake>=3.24,<4" ninja "scikit-build-core>=0.10" cython setuptools-scm
export PATH=$VENV/bin:$PATH

# ---- TVM source --------------------------------------------------------------------------------------------
if [ -z "${TVM_SRC:-}" ]; then
  TVM_SRC=$WORK/tvm-$TVM_VERSION
  if [ ! -d "$TVM_SRC" ]; then
    if [ "$TVM_GIT" = 1 ]; then
      git clone --recursive --depth 1 --branch "v$TVM_VERSION" https://github.com/apache/tvm "$TVM_SRC"
    else
      say "fetching $TVM_URL"
      (cd "$WORK" && wget -q -O tvm-src.tar.gz "$TVM_URL" && mkdir -p "$TVM_SRC" \
         && tar xzf tvm-src.tar.gz -C "$TVM_SRC" --strip-components=1)
    fi
  fi
fi
[ -f "$TVM_SRC/src/backend/cuda/runtime/cuda_module.cc" ] || die "$TVM_SRC does not look like TVM 0.27's source"
[ -f "$TVM_SRC/3rdparty/tvm-ffi/CMakeLists.txt" ] || die "$TVM_SRC/3rdparty/tvm-ffi is empty (clone with --recursive)"

if [ "$PATCH" = auto ]; then [ "$CUDA_MAJOR" -lt 12 ] && PATCH=1 || PATCH=0; fi
if [ "$PATCH" = 1 ]; then
  if grep -q "CUDA < 12 (JetPack 4.6" "$TVM_SRC/src/backend/cuda/runtime/cuda_module.cc"; then
    say "patch already applied"
  else
    say "applying $(basename "$PATCH_FILE") (CUDA $CUDA_VER < 12)"
    patch -d "$TVM_SRC" -p1 --forward <"$PATCH_FILE" \
      || die "the patch does not apply to this source: edit cuda_module.cc by hand (see the patch)"
  fi
fi

# ---- build: runtime + CUDA runtime + C++ RPC server ---------------------------------------------------------
BUILD=$WORK/build-sm$CUDA_ARCH
say "configuring $BUILD"
cmake -S "$TVM_SRC" -B "$BUILD" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
  -DUSE_CUDA="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -DCMAKE_CUDA_HOST_COMPILER="$CUDA_HOST_CXX" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
  -DUSE_LLVM=OFF -DUSE_RPC=ON -DUSE_CPP_RPC=ON -DUSE_GTEST=OFF \
  -DUSE_CUDNN=OFF -DUSE_CUBLAS=OFF -DUSE_CUTLASS=OFF -DUSE_THRUST=OFF -DUSE_CURAND=OFF -DUSE_NCCL=OFF \
  -DUSE_NVSHMEM=OFF -DUSE_NVTX=OFF -DUSE_OPENCL=OFF -DUSE_VULKAN=OFF -DUSE_OPENMP=none \
  -DTVM_BUILD_PYTHON_MODULE=OFF -DSUMMARIZE=ON
say "building tvm_runtime tvm_runtime_cuda tvm_rpc with $JOBS jobs"
cmake --build "$BUILD" --target tvm_runtime tvm_runtime_cuda tvm_rpc -j "$JOBS"

# ---- install --------------------------------------------------------------------------------------------
say "installing into $PREFIX"
mkdir -p "$PREFIX/lib" "$PREFIX/bin" "$PREFIX/python"
find "$BUILD" -maxdepth 3 \( -name 'libtvm_runtime*.so' -o -name 'libtvm_ffi*.so' \) -exec cp -f {} "$PREFIX/lib/" \;
cp -f "$(find "$BUILD" -maxdepth 3 -type f -name tvm_rpc | head -n1)" "$PREFIX/bin/tvm_rpc"
# the Python side: tvm-ffi built from the same source, and TVM's Python package (runtime-only use)
CXX="$CXX" CC="$CC" "$PY" -m pip install --no-build-isolation "$TVM_SRC/3rdparty/tvm-ffi"
rm -rf "$PREFIX/python/tvm" && cp -r "$TVM_SRC/python/tvm" "$PREFIX/python/tvm"
cat >"$PREFIX/env.sh" <<EOF
# source this to use the TVM $TVM_VERSION runtime built by build_tvm_runtime.sh
source "$VENV/bin/activate"
export PYTHONPATH="$PREFIX/python\${PYTHONPATH:+:\$PYTHONPATH}"
export TVM_LIBRARY_PATH="$PREFIX/lib"
export TVM_USE_RUNTIME_LIB=1
export LD_LIBRARY_PATH="$PREFIX/lib:$CUDA_HOME/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="$PREFIX/bin:$CUDA_HOME/bin:\$PATH"
EOF

say "smoke test"
# shellcheck disable=SC1091
source "$PREFIX/env.sh"
python - <<'EOF'
import tvm
dev = tvm.cuda(0)
print("tvm", tvm.__version__, "cuda device:", dev.exist, dev.compute_version if dev.exist else "-")
EOF
say "done: source $PREFIX/env.sh; RPC server: tvm_rpc server --host=0.0.0.0 --port=9090"
