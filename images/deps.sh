#!/usr/bin/env bash
# Install the host tools the images/ harness needs on a Debian 12 machine.
# Idempotent: installs only what is missing. Run as root (or with sudo).
set -euo pipefail
pkgs=(qemu-system-x86 cpio zstd xz-utils gzip kmod file binutils python3 dpkg-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "deps: all host packages present (${pkgs[*]})"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
