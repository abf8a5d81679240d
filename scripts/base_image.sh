#!/usr/bin/env bash
# A base image for the Dockerfile (its BASE_IMAGE argument) made of Debian's own packages, for hosts that
# reach the Debian mirror and PyPI but no image registry. mmdebstrap builds Debian 12 (bookworm: Python 3.11,
# as python:3.11-slim) with python3-venv into a tarball; the engine imports it. The CA certificates this host
# trusts beyond Debian's (/usr/local/share/ca-certificates, e.g. a TLS-inspecting proxy's) are copied in, and
# pip is told to use the system's store rather than its own, so pip and apt work inside the build as here.
# About 20 s; about 200 MB. Usage: scripts/base_image.sh ENGINE TAG   (e.g. podman localhost/specdec-base:bookworm)
set -euo pipefail
ENGINE=${1:?engine: podman or docker}
TAG=${2:?tag for the image}
MIRROR=${SPECDEC_DEBIAN_MIRROR:-http://deb.debian.org/debian}

command -v mmdebstrap >/dev/null || {
    echo "base_image: mmdebstrap is missing (Debian: apt-get install mmdebstrap)" >&2
    exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
hooks=()
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    hooks+=(--customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share'
            --customize-hook='chroot "$1" update-ca-certificates >/dev/null')
fi
hooks+=(--customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"')
start=$(date +%s)
# documentation, manual pages and translations are left out, as in Debian's own slim images
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "${hooks[@]}" bookworm "$work/rootfs.tar" "$MIRROR"
"$ENGINE" import --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$TAG" >/dev/null
echo "base_image: $TAG built from Debian bookworm packages in $(( $(date +%s) - start )) s"
