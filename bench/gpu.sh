#!/usr/bin/env bash
# The device machine's entry point for bench/gpu.py: CUDA correctness, speed against diffusers,
# the FLOP bound; one table at the end, in about 6 minutes on an H100.
#
# The machine's image has torch, transformers, safetensors, Pillow, numpy, regex, tqdm and
# huggingface_hub, but neither diffusers (the reference) nor open_clip (which ships the CLIP BPE
# vocabulary our offline tokenizer reads); both are pure-Python wheels carried in .whl/.
# Our .venv cannot travel (CPU torch, far over the 64 MiB limit) and nothing is installed from
# the repo: PYTHONPATH=<repo root> makes ldm/, autoencoder/, text_encoder/, pipelines/ importable.
#
# Once, here, in the repo root (versions: the ones the tests use; diffusers 0.42 needs
# huggingface_hub >= 1.32, which the image has):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 open_clip_torch==3.3.0
# and, for the xformers rows, its wheel (3 MiB; built for CUDA 12, so it needs libcudart.so.12
# beside the image's CUDA 13 torch: only that library, in .whl/lib, since the runtime wheel's
# nvidia/__init__.py would shadow the image's nvidia packages):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d /tmp nvidia-cuda-runtime-cu12==12.8.90
#   mkdir -p .whl/lib && unzip -j /tmp/nvidia_cuda_runtime_cu12-*.whl \
#       nvidia/cuda_runtime/lib/libcudart.so.12 -d .whl/lib
# Then, with the device tool, one call (H100; leave kind out):
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
# On an H100 (2026-11-26) the whole script ran in 230 s after a 1-2 minute machine start; the
# compiles dominate (~50 s each on a fresh machine). What is left of a task's 15 device-minutes
# fits the quick comparison (ours compile + CUDA graph vs diffusers reduce-overhead; 150 s):
#   run(command="bash bench/gpu.sh --quick --budget 170", carry=[".whl"], timeout_s=200)
# and then give_back. Inductor's C++ wrapper (--cpp-wrapper) compiles take ~200 s each, so its
# like-for-like comparison is a call of its own (both libraries, with and without; ~500 s):
#   run(command="bash bench/gpu.sh --quick --cpp-wrapper --budget 530", carry=[".whl"], timeout_s=590)
# (2026-11-27: 557 s of work, 590 s wall with the start of Python; 73.0 vs 74.5 it/s.)
# Its files come back from $OUT: gpu_bench.json (measurements, written after every stage) and
# gpu_bench.log. Here, put the run into BENCHMARKS.md with:
#   .venv/bin/python bench/gpu.py --from-json <files_at>/gpu_bench.json --write
#
# Arguments are passed on to gpu.py (e.g. --budget 300, --no-compile,
# --compile-mode max-autotune-no-cudagraphs). Exit status: gpu.py's (1 if a check failed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .whl/lib ]; then  # libcudart.so.12 for the carried xformers (see above)
    export LD_LIBRARY_PATH=$PWD/.whl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_bench}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
"$PYTHON" bench/gpu.py --json "$out/gpu_bench.json" "$@" 2>&1 | tee "$out/gpu_bench.log"
