#!/usr/bin/env bash
# Install the host tools the images/ harness needs on a Debian 12 machine,
# and make sure apt's package lists know the packages the images are built
# from.  Idempotent: does nothing when all is in place.  Needs root (or sudo).
set -euo pipefail
pkgs=(qemu-system-x86 cpio gzip kmod binutils gcc libc6-dev python3 dpkg)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The images come from bookworm and bookworm-security: apt must know them.
# (Capture first: grep -q closing the pipe early trips pipefail.)
candidates() { apt-cache policy xen-utils-4.17 fio 2>/dev/null | grep 'Candidate:' || true; }
lists_ok=1
c=$(candidates)
case "$c" in *"(none)"*|"") lists_ok=0 ;; esac

if [ ${#missing[@]} -eq 0 ] && [ $lists_ok -eq 1 ]; then
    echo "deps: host tools present, apt lists know the image packages"
    exit 0
fi
echo "deps: apt-get update"
$SUDO apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
c=$(candidates)
if [ -z "$c" ] || [[ "$c" == *"(none)"* ]]; then
    echo "deps: apt cannot find xen-utils-4.17: this harness needs Debian 12 (bookworm) with bookworm-security" >&2
    exit 1
fi
echo "deps: done"
