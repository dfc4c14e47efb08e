# syntax=docker/dockerfile:1.7
# kubellm base/data image: data prep, tokenizer, fingerprint/report steps and every small KFP step.
# CPU-only PyTorch (the data stages never touch a GPU); kfp is installed so lightweight components
# run with install_kfp_package=False.
#
#   docker build -f images/base.Dockerfile -t kubellm-base:dev .        (from the repo root)
#   or: make images   (images/build.sh: one registry/tag for all three images)
#
# Base image pinned by EXACT TAG (not by digest: no registry is reachable from where this file was
# written, so no digest can be stated honestly). To pin by digest pass
#   --build-arg BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

# Extra index with the CPU wheels of torch: 2.13.0+cpu satisfies the pin torch==2.13.0 and wins over
# the PyPI wheel, which pulls GBs of CUDA libraries on linux x86_64.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin

RUN python -m venv /opt/venv

# Dependencies first (cache layer), exactly as pinned in requirements/constraints.txt.
COPY requirements/constraints.txt /opt/kubellm/src/requirements/constraints.txt
COPY images/build-constraints.txt /opt/kubellm/src/images/build-constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /opt/kubellm/src/images/build-constraints.txt pip setuptools wheel \
 && pip install -c /opt/kubellm/src/requirements/constraints.txt --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY pyproject.toml README.md /opt/kubellm/src/
COPY components /opt/kubellm/src/components
COPY pipelines /opt/kubellm/src/pipelines
# --no-build-isolation: deepspeed's setup.py imports the torch installed above.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-build-isolation -c /opt/kubellm/src/requirements/constraints.txt /opt/kubellm/src \
 && pip check \
 && python -c "import kfp, kubellm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
 && rm -rf /opt/kubellm/src \
 && chmod -R a+rX,go-w /opt/venv

# The commit's revision is declared after the heavy layers: every RUN after an ARG misses the
# build cache when its value changes, and it changes with every commit.
ARG KUBELLM_CODE_VERSION=unknown
LABEL org.opencontainers.image.title="kubellm-base" \
      org.opencontainers.image.source="https://github.com/kubellm/kubellm" \
      org.opencontainers.image.revision="${KUBELLM_CODE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# Every path a process writes to lives under /tmp, which the chart mounts as an emptyDir: the root
# filesystem can then be read-only, and any numeric UID works (nothing depends on /etc/passwd).
ENV KUBELLM_CODE_VERSION=${KUBELLM_CODE_VERSION} \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/tmp/cache/torch_extensions \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    KUBELLM_CACHE_DIR=/tmp/cache/kubellm

WORKDIR /tmp
USER 10001:0
CMD ["kubellm", "--help"]
