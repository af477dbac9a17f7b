#!/usr/bin/env bash
# Builds llama.cpp (the copy vendored in llama-cpp-python's source package) once: its tools (llama-bench,
# llama-perplexity, llama-speculative, llama-completion, llama-quantize) and the shared libraries, then installs the `llama_cpp` Python
# bindings into .venv on top of those libraries. Optional: skiplm's GGUF export works without it (transformers'
# GGUF loader is then the test oracle); `benchmarks/gguf` needs it. ~5-7 minutes on 2 cores.
#
# Instruction sets come from this machine's /proc/cpuinfo, not from -march=native (a native build died with
# "Illegal instruction" on one of this project's machines). SKIPLM_LLAMA_CPP moves the build (default
# ~/.cache/skiplm/llama.cpp); SKIPLM_LLAMA_CMAKE_ARGS adds cmake options (e.g. -DGGML_CUDA=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
ROOT=${SKIPLM_LLAMA_CPP:-${SKIPLM_CACHE_DIR:-$HOME/.cache/skiplm}/llama.cpp}
VENV=${SKIPLM_VENV:-.venv}
mkdir -p "$ROOT"

if [ ! -d "$ROOT/src/vendor/llama.cpp" ]; then
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$ROOT/sdist"
    rm -rf "$ROOT/src.partial" && mkdir -p "$ROOT/src.partial"
    tar xzf "$ROOT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/src.partial" --strip-components=1
    mv "$ROOT/src.partial" "$ROOT/src"
fi

# x86 instruction sets this CPU has, as ggml's cmake options (absent flags stay off).
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
isa=()
if [ -n "$flags" ]; then
    isa=(-DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)"
         -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
         -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)"
         -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi

tools=(llama-bench llama-perplexity llama-speculative llama-completion llama-quantize)
if [ ! -x "$ROOT/build/bin/llama-speculative" ]; then
    # shellcheck disable=SC2086
    cmake -S "$ROOT/src/vendor/llama.cpp" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF "${isa[@]}" -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON \
        ${SKIPLM_LLAMA_CMAKE_ARGS:-} > "$ROOT/cmake.log"
    cmake --build "$ROOT/build" -j "$(nproc)" --target "${tools[@]}" > "$ROOT/build.log"
fi

# The bindings, without building llama.cpp a second time: their own libraries are the ones just built.
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check "$ROOT/src"
fi
lib=$("$VENV/bin/python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$lib"
cp -P "$ROOT"/build/bin/*.so* "$lib"/
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'system info:', llama_cpp.llama_print_system_info().decode())"
echo "llama.cpp tools: $ROOT/build/bin"
