#!/bin/sh
# llm-awq's CUDA kernels (awq/kernels: the awq_inference_engine extension) for the method image's
# upstream venv. [upstream.image].build runs it in the checkout, as root, with that venv's python
# first on PATH and TORCH_CUDA_ARCH_LIST from [upstream.image].env.
#
# The compiler must match torch's CUDA major version (torch 2.3.0's wheels: CUDA 12.1):
#   1. an nvcc of that version already there (CUDA_HOME, /usr/local/cuda-<v>, /usr/local/cuda:
#      a CUDA devel base image);
#   2. else from NVIDIA's apt repository, which the nvidia/cuda base images carry (the GPU hosts'
#      base): cuda-minimal-build-<v>, that is nvcc and the CUDA runtime's headers. The cuBLAS,
#      cuSPARSE and cuSOLVER headers that torch's CUDA headers include come from torch's own
#      nvidia-* wheels in the venv (the toolkit's -dev packages are GBs of static libraries);
#   3. else (a CPU base, e.g. the offline one): kernels_standin.py is installed as
#      awq_inference_engine; its docstring says why no job of the harness needs the kernels.
# A build that starts (1 or 2) and fails fails the image; nothing falls back silently.
# LLMCBENCH_AWQ_KERNELS=build|stand-in forces one way (build: no compiler is an error).
set -eu
FILES=${LLMCBENCH_BUILD_FILES:-$(dirname "$0")}
MODE=${LLMCBENCH_AWQ_KERNELS:-auto}
SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")
CUDA=$(python -c "import torch; print(torch.version.cuda or '')")
say() { echo "awq-kernels: $*"; }

stand_in() {
  cp "$FILES/kernels_standin.py" "$SITE/awq_inference_engine.py"
  say "not built ($1): the stand-in is installed; upstream's search, fake quantization and packing run, its real-quant inference does not"
}

no_compiler() {
  if [ "$MODE" = build ]; then say "cannot build: $1" >&2; exit 1; fi
  stand_in "$1"
  exit 0
}

# the CUDA home whose nvcc has torch's major version
find_cuda_home() {
  for home in "${CUDA_HOME:-}" "/usr/local/cuda-$CUDA" /usr/local/cuda; do
    [ -n "$home" ] && [ -x "$home/bin/nvcc" ] || continue
    major=$("$home/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\)\..*/\1/p')
    if [ "$major" = "${CUDA%%.*}" ]; then echo "$home"; return 0; fi
  done
  return 1
}

nvidia_apt_repository() {
  command -v apt-get >/dev/null && grep -rqs "developer.download.nvidia.com" /etc/apt/sources.list /etc/apt/sources.list.d/
}

if [ "$MODE" = stand-in ]; then stand_in "LLMCBENCH_AWQ_KERNELS=stand-in"; exit 0; fi
[ -n "$CUDA" ] || no_compiler "torch $(python -c 'import torch; print(torch.__version__)') is not a CUDA build"
home=$(find_cuda_home || true)
apt_updated=
if [ -z "$home" ]; then
  nvidia_apt_repository || no_compiler "no nvcc for CUDA $CUDA here and no NVIDIA apt repository to install one from"
  toolkit="cuda-minimal-build-$(echo "$CUDA" | tr . -)"
  apt-get update && apt_updated=1
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$toolkit"
  home=$(find_cuda_home) || { say "$toolkit gave no nvcc $CUDA" >&2; exit 1; }
fi
# the host compiler and the interpreter's headers, when the base lacks them
PYDEV=$(basename "$(readlink -f "$(command -v python)")")-dev
if ! command -v c++ >/dev/null || ! python -c "import os, sysconfig, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
  [ -n "$apt_updated" ] || apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ "$PYDEV"
fi
CPATH=$(python -c "import glob, os, nvidia; print(os.pathsep.join(sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, '*', 'include')))))")
export CUDA_HOME="$home" PATH="$home/bin:$PATH" CPATH
(cd awq/kernels && python setup.py install)
python -c "import torch, awq_inference_engine"  # imports without a GPU, as a job's first import does
say "built with $("$home/bin/nvcc" --version | tail -1) for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
