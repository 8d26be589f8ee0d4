# syntax=docker/dockerfile:1
# cert-agent: the CSI node plugin image. Build from the repository root:
#   docker build -t ghcr.io/csi-cert-agent/cert-agent:0.1.0 .
# Pin the base by digest for reproducible builds, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: build the wheel and install it with its dependencies into a venv -------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/cert-agent \
 && /opt/cert-agent/bin/pip install --no-cache-dir pip==25.3 build==1.3.0
# Only what the wheel needs; the generated gRPC/protobuf code is committed under agent/csi/.
COPY pyproject.toml README.md constraints.txt ./
COPY agent ./agent
# constraints.txt pins every runtime dependency, so the image is the same on every build.
# Every dependency ships manylinux wheels, so no compiler is needed here either; --only-binary
# makes a missing wheel fail the build instead of pulling in a toolchain.
RUN /opt/cert-agent/bin/python -m build --wheel --outdir /dist . \
 && /opt/cert-agent/bin/pip install --no-cache-dir --only-binary=:all: \
        --constraint constraints.txt /dist/*.whl \
 && /opt/cert-agent/bin/pip uninstall --yes build pip \
 && /opt/cert-agent/bin/python -m compileall -q /opt/cert-agent

# --- runtime: the interpreter, the venv, nothing else --------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cert-agent" \
      org.opencontainers.image.description="CSI node plugin that gives every pod its own TLS key and certificate" \
      org.opencontainers.image.source="https://github.com/csi-cert-agent/cert-agent" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENV PATH=/opt/cert-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=builder /opt/cert-agent /opt/cert-agent
# The agent runs as root: it mounts tmpfs and bind mounts into pods' volume directories. The
# DaemonSet keeps the root filesystem read-only; everything it writes is on mounted volumes.
WORKDIR /
ENTRYPOINT ["cert-agent", "serve"]
