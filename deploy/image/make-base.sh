#!/bin/sh
# Build the local Python base images for the Dockerfile where no image registry is reachable.
#
#   deploy/image/make-base.sh            # as root; needs debootstrap, docker and a Debian mirror
#
# makes two images from one debootstrap of Debian 12 (--variant=minbase) with Debian's python3
# (3.11, /usr/bin/python3):
#
#   $BASE_IMAGE     local/python:3.11-bookworm-minbase  the runtime base: python3 and what it needs
#   $BUILDER_IMAGE  local/python:3.11-bookworm-build    the same plus python3-venv (ensurepip) and
#                                                      this machine's CA bundle, for pip in the
#                                                      builder stage only
#
# Both come from the same rootfs, so the venv the builder makes (/usr/bin/python3) runs unchanged
# in the runtime stage. Then:
#
#   docker build --network host --build-arg PYTHON_IMAGE=local/python:3.11-bookworm-minbase \
#       --build-arg BUILDER_IMAGE=local/python:3.11-bookworm-build -t cert-agent:dev .
#
# (`make image-local` does both.) With a registry, the Dockerfile's default (the official
# python:3.11-slim-bookworm for both stages) needs none of this.
#
# Reproducible: the package set is fixed by the suite and the list below; pin the package versions
# too with MIRROR= a snapshot of the archive (default: debootstrap's own mirror).
set -eu

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-}
BASE_IMAGE=${BASE_IMAGE:-local/python:3.11-bookworm-minbase}
BUILDER_IMAGE=${BUILDER_IMAGE:-local/python:3.11-bookworm-build}
# Only the builder needs these: ensurepip's pip and setuptools wheels for `python3 -m venv`.
BUILDER_ONLY="python3-venv python3.11-venv python3-pip-whl python3-setuptools-whl"
# The host's CA bundle lets pip reach PyPI through the same (possibly TLS-intercepting) proxy as
# the host; it goes into the builder image only, never into the runtime base.
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

work=$(mktemp -d /tmp/cert-agent-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

# Without MIRROR, no mirror argument: debootstrap picks its default.
debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$root" ${MIRROR:+"$MIRROR"}

# What a container never needs: package indexes and caches, logs, documentation (copyright files
# stay: they are the licences), man and info pages, translations. Also a dpkg rule so that an
# apt-get install in a derived image leaves them out as well.
clean() {
    rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old \
        "$1"/var/lib/dpkg/*-old "$1"/var/log/* "$1"/usr/share/man/* "$1"/usr/share/info/* \
        "$1"/usr/share/locale/* "$1"/usr/share/lintian "$1"/usr/share/linda "$1"/tmp/* \
        "$1"/root/.cache
    find "$1"/usr/share/doc -mindepth 1 -not -type d -not -name copyright -delete
    find "$1"/usr/share/doc -mindepth 1 -type d -empty -delete
}
mkdir -p "$root"/etc/dpkg/dpkg.cfg.d
cat >"$root"/etc/dpkg/dpkg.cfg.d/01-minbase <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$root"/etc/apt/apt.conf.d/01-minbase
clean "$root"

import_image() {
    # $1 tag; further arguments are --change instructions.
    tag=$1
    shift
    tar --numeric-owner --xattrs -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$@" - "$tag"
}

mkdir -p "$root"/etc/ssl
cp "$HOST_CA_BUNDLE" "$root"/etc/ssl/pip-ca-bundle.crt
import_image "$BUILDER_IMAGE" --change 'ENV PIP_CERT=/etc/ssl/pip-ca-bundle.crt'
rm "$root"/etc/ssl/pip-ca-bundle.crt

# shellcheck disable=SC2086 # a list of package names
chroot "$root" dpkg --purge $BUILDER_ONLY
clean "$root"
import_image "$BASE_IMAGE"

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F -e "$BASE_IMAGE" -e "$BUILDER_IMAGE"
