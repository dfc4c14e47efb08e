# syntax=docker/dockerfile:1.7
# kubellm evaluation image: lm-eval (HF backend) on CUDA PyTorch 2.13.0, plus kubellm's bundled
# offline task YAML/data, matplotlib for the report plots, and kfp.
#
#   docker build -f images/eval.Dockerfile -t kubellm-eval:dev .        (from the repo root)
#   or: make images
#
# Pinned by EXACT TAG (no digest: no registry is reachable from where this file was written).
# Pin by digest with --build-arg PYTORCH_RUNTIME_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime@sha256:<digest>
ARG PYTORCH_RUNTIME_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${PYTORCH_RUNTIME_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -c "import sys, torch; assert sys.version_info[:2] == (3, 11), sys.version; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# A venv on top of the image's Python: it sees the image's CUDA torch and holds only what we add.
RUN python -m venv --system-site-packages /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/opt/conda/bin:/usr/local/bin:/usr/bin:/bin

COPY requirements/constraints.txt /opt/kubellm/src/requirements/constraints.txt
COPY images/build-constraints.txt /opt/kubellm/src/images/build-constraints.txt
COPY pyproject.toml README.md /opt/kubellm/src/
COPY components /opt/kubellm/src/components
COPY pipelines /opt/kubellm/src/pipelines
# DS_BUILD_OPS=0: evaluation never trains, so DeepSpeed (a dependency of the package) installs as
# pure Python. --no-build-isolation: its setup.py imports the image's torch.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /opt/kubellm/src/images/build-constraints.txt pip setuptools wheel \
 && DS_BUILD_OPS=0 pip install --no-build-isolation -c /opt/kubellm/src/requirements/constraints.txt /opt/kubellm/src \
 && pip check \
 && python -c "import kfp, kubellm, lm_eval, matplotlib" \
 && rm -rf /opt/kubellm/src \
 && chmod -R a+rX,go-w /opt/venv

# The commit's revision is declared after the heavy layers: every RUN after an ARG misses the
# build cache when its value changes, and it changes with every commit.
ARG KUBELLM_CODE_VERSION=unknown
LABEL org.opencontainers.image.title="kubellm-eval" \
      org.opencontainers.image.source="https://github.com/kubellm/kubellm" \
      org.opencontainers.image.revision="${KUBELLM_CODE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    KUBELLM_CODE_VERSION=${KUBELLM_CODE_VERSION} \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    HF_DATASETS_CACHE=/tmp/cache/huggingface/datasets \
    TORCH_EXTENSIONS_DIR=/tmp/cache/torch_extensions \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    KUBELLM_CACHE_DIR=/tmp/cache/kubellm

WORKDIR /tmp
USER 10001:0
CMD ["kubellm", "--help"]
