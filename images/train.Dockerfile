# syntax=docker/dockerfile:1.7
# kubellm training image: CUDA PyTorch 2.13.0 + DeepSpeed 0.19.8 with its host-independent ops compiled
# ahead of time (CPU Adam is JIT-compiled on the node: see the DS_BUILD_* comment below).
# Runs pretrain/SFT/DPO workers inside the PyTorchJob and the launcher step that creates it.
#
#   docker build -f images/train.Dockerfile -t kubellm-train:dev .      (from the repo root)
#   or: make images
#
# Two stages from the same PyTorch release: the -devel image has nvcc to build DeepSpeed's CUDA ops;
# the -runtime image ships them. Both pinned by EXACT TAG (no digest: no registry is reachable from
# where this file was written, so none can be stated honestly). Pin by digest with
#   --build-arg PYTORCH_DEVEL_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel@sha256:<digest>
#   --build-arg PYTORCH_RUNTIME_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime@sha256:<digest>
# The images' torch is the CUDA build of 2.13.0 (2.13.0+cu128 satisfies the pin torch==2.13.0).
ARG PYTORCH_DEVEL_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
ARG PYTORCH_RUNTIME_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

FROM ${PYTORCH_DEVEL_IMAGE} AS build
# GPUs to compile CUDA kernels for (A100, A10/L4/4090 family, H100/H200), plus PTX of the newest so
# later GPUs (Blackwell) JIT the prebuilt ops from it instead of finding no kernel. No GPU exists at build time.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX"
ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN python -c "import sys, torch; assert sys.version_info[:2] == (3, 11), sys.version; assert torch.__version__.startswith('2.13.0') and torch.version.cuda, torch.__version__"
# A venv on top of the image's Python: it sees the image's CUDA torch and holds only what we add,
# so the runtime stage copies /opt/venv alone.
RUN python -m venv --system-site-packages /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/opt/conda/bin:/usr/local/bin:/usr/bin:/bin
COPY requirements/constraints.txt /opt/kubellm/src/requirements/constraints.txt
COPY images/build-constraints.txt /opt/kubellm/src/images/build-constraints.txt
COPY pyproject.toml README.md /opt/kubellm/src/
COPY components /opt/kubellm/src/components
COPY pipelines /opt/kubellm/src/pipelines
# DS_BUILD_*=1 compiles the ops DeepSpeed would otherwise JIT-compile on first use (needs nvcc and a
# writable cache at run time): fused Adam (GPU) and the flatten utils (ZeRO). Their host flags are
# fixed (-O3 -std=..., CUDA archs from TORCH_CUDA_ARCH_LIST), so the result runs on any node.
# CPU Adam (ZeRO offload) is deliberately NOT prebuilt: DeepSpeed's CPU op builder
# (deepspeed/ops/op_builder/cpu/builder.py, CPUOpBuilder.cxx_args) compiles it with -march=native and
# a SIMD width (-D__AVX512__/-D__AVX256__) detected on the BUILD host, and DeepSpeed 0.19.8 has no
# setting to choose them (cpu_arch()/simd_width() read only the host CPU). An image built on an
# AVX-512 host would then die with SIGILL on nodes without AVX-512. It is JIT-compiled instead, on the
# node that uses it, the first time a run offloads the optimizer (~30 s, g++ and ninja are in the
# image, the build goes to the writable $TORCH_EXTENSIONS_DIR). The same holds for the CPU
# accelerator's fused_adam/cpu_adam, so the CPU-op prebuild below keeps only the shared-memory comm op,
# whose builder uses fixed flags (-O2 -fopenmp).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /opt/kubellm/src/images/build-constraints.txt -c /opt/kubellm/src/requirements/constraints.txt pip setuptools wheel ninja \
 && DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 DS_ACCELERATOR=cuda \
    pip install --no-build-isolation --no-binary deepspeed -c /opt/kubellm/src/requirements/constraints.txt \
        /opt/kubellm/src \
 && pip check \
 && python -c "import deepspeed.git_version_info as g; assert g.installed_ops['fused_adam'] and not g.installed_ops['cpu_adam'], g.installed_ops"
# The CPU shared-memory comm op (DS_ACCELERATOR=cpu) is a JIT extension: prebuild it into a read-only
# location that kubellm.training.worker (and the ENTRYPOINT, where it runs) copies into the writable
# $TORCH_EXTENSIONS_DIR. `import kubellm.training` first puts the venv's pinned ninja on PATH.
RUN TORCH_EXTENSIONS_DIR=/opt/kubellm/torch_extensions DS_ACCELERATOR=cpu \
    python -c "import kubellm.training; from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
 && rm -rf /opt/kubellm/src \
 && chmod -R a+rX,go-w /opt/venv /opt/kubellm

FROM ${PYTORCH_RUNTIME_IMAGE}
# g++ compiles the ops DeepSpeed JIT-builds on the node (cpu_adam, see above) and lets torch's
# extension loader re-validate the prebuilt shm comm op (it runs ninja on every load).
# It comes from the distribution release of the pinned base image; no version is stated here because
# none can be checked from where this file was written. Pin one with --build-arg GXX_PACKAGE=g++=<version>.
ARG GXX_PACKAGE=g++
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${GXX_PACKAGE}" \
 && rm -rf /var/lib/apt/lists/*
# The commit's revision is declared after the heavy layers: every RUN after an ARG misses the
# build cache when its value changes, and it changes with every commit.
ARG KUBELLM_CODE_VERSION=unknown
LABEL org.opencontainers.image.title="kubellm-train" \
      org.opencontainers.image.source="https://github.com/kubellm/kubellm" \
      org.opencontainers.image.revision="${KUBELLM_CODE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/kubellm/torch_extensions /opt/kubellm/torch_extensions
COPY images/entrypoint.sh /usr/local/bin/kubellm-entrypoint
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/opt/conda/bin:/usr/local/bin:/usr/bin:/bin \
    KUBELLM_CODE_VERSION=${KUBELLM_CODE_VERSION} \
    KUBELLM_PREBUILT_TORCH_EXTENSIONS=/opt/kubellm/torch_extensions \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/tmp/cache/torch_extensions \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    KUBELLM_CACHE_DIR=/tmp/cache/kubellm
RUN python -c "import deepspeed, kfp, kubellm, torch; assert torch.version.cuda" \
 && chmod 0755 /usr/local/bin/kubellm-entrypoint
WORKDIR /tmp
USER 10001:0
ENTRYPOINT ["/usr/local/bin/kubellm-entrypoint"]
CMD ["kubellm", "--help"]
