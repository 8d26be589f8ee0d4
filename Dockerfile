# cert-agent: the CSI node plugin image. Build from the repository root:
#   docker build -t ghcr.io/csi-cert-agent/cert-agent:0.1.0 .
# Pin the base by digest for reproducible builds, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# Without a registry, make local bases first (deploy/image/make-base.sh, `make image-local`) and
# pass them as PYTHON_IMAGE and BUILDER_IMAGE; docs/image.md has the commands and the sizes.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The builder needs `python3 -m venv` with ensurepip, which the official image has and Debian's
# python3 has only with python3-venv. It must be the same Python as PYTHON_IMAGE, at the same
# path: the venv it makes runs unchanged in the runtime stage.
ARG BUILDER_IMAGE=${PYTHON_IMAGE}

# --- builder: build the wheel and install it with its dependencies into a venv -------------------
FROM ${BUILDER_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The build tools live in a venv of their own that never reaches the image.
RUN python3 -m venv /opt/tools \
 && /opt/tools/bin/pip install --no-cache-dir pip==25.3 build==1.3.0
# Only what the wheel needs; the generated gRPC/protobuf code is committed under agent/csi/.
COPY pyproject.toml README.md constraints.txt ./
COPY agent ./agent
# The agent's venv gets no pip, setuptools or wheel: the tools' pip installs into it (--python).
# constraints.txt pins every runtime dependency, so the image is the same on every build.
# Every dependency ships manylinux wheels, so no compiler is needed here either; --only-binary
# makes a missing wheel fail the build instead of pulling in a toolchain.
RUN /opt/tools/bin/python -m build --wheel --outdir /dist . \
 && python3 -m venv --without-pip /opt/cert-agent \
 && /opt/tools/bin/pip --python /opt/cert-agent/bin/python install --no-cache-dir --no-compile \
        --only-binary=:all: --constraint constraints.txt /dist/*.whl
# Keep what runs: drop the dependencies' tests, type stubs and C sources, the venv's activation
# scripts, and PyYAML's libyaml binding (2.7 MB the agent never calls: yaml.safe_load is the
# pure-Python SafeLoader; tests/test_image.py keeps agent/ off the C loaders). Then compile the
# bytecode once: a read-only root cannot cache it, so every start would compile again. The
# dependencies ship bytecode only (sourceless .pyc where the .py was; their tracebacks still name
# file and line of a pinned version); the agent keeps its sources, for tracebacks with source
# lines. docs/image.md has the sizes and start-up times of each choice. Absolute paths: code
# objects name /opt/cert-agent/... in tracebacks. unchecked-hash: no stat of a source per import.
WORKDIR /opt/cert-agent/lib/python3.11/site-packages
RUN find . -depth -type d -name tests -exec rm -rf {} + \
 && find . -type f \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.c' \
        -o -name '*.h' -o -name py.typed \) -delete \
 && rm -f /opt/cert-agent/bin/activate* /opt/cert-agent/bin/Activate.ps1 \
 && rm yaml/_yaml.cpython-*.so \
 && python3 -m compileall -q -j 0 -b -x '/site-packages/agent/' "$PWD" \
 && find . -name '*.py' -not -path './agent/*' -delete \
 && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash "$PWD/agent"

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
