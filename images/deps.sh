#!/usr/bin/env bash
# Install the host tools the images/ harness needs on a Debian 12 machine,
# QEMU at the exact version pinned in packages.lock ([host]), and make sure
# apt's package lists know the pinned image packages.  Idempotent: does
# nothing when all is in place.  Needs root (or sudo).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lock="$here/packages.lock"
tools=(cpio gzip kmod binutils gcc libc6-dev python3 dpkg)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

# "name=version" for every [host] pin.
pins=()
while read -r name ver; do
    pins+=("$name=$ver")
done < <(awk '/^\[/{s=$0; next} s=="[host]" && NF==2 && $1 !~ /^#/ {print $1, $2}' "$lock")
[ ${#pins[@]} -gt 0 ] || { echo "deps: no [host] pins in $lock" >&2; exit 1; }

installed() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null; }
missing=()
for p in "${tools[@]}"; do
    installed "$p" | grep -q "^install ok installed" || missing+=("$p")
done
for pv in "${pins[@]}"; do
    [ "$(installed "${pv%%=*}")" = "install ok installed ${pv#*=}" ] || missing+=("$pv")
done
# The images come from bookworm and bookworm-security: apt must know the
# pinned xen-utils version. (Capture first: grep -q closing the pipe early
# trips pipefail.)
xen_pin=$(awk '$1 == "xen-utils-4.17" {print $2}' "$lock")
known() { apt-cache madison xen-utils-4.17 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' || true; }
lists_ok=0
known | grep -qxF "$xen_pin" && lists_ok=1

if [ ${#missing[@]} -eq 0 ] && [ $lists_ok -eq 1 ]; then
    echo "deps: host tools present at their pinned versions, apt knows the image packages"
    exit 0
fi
echo "deps: apt-get update"
$SUDO apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            --allow-downgrades "${missing[@]}"; then
        echo "deps: could not install the pinned host packages (${missing[*]})." >&2
        echo "deps: if Debian no longer serves a pinned version, move the pins on purpose:" >&2
        echo "deps:   images/build.py --repin  (see images/README.md, 'Moving the pins')" >&2
        exit 1
    fi
fi
if ! known | grep -qxF "$xen_pin"; then
    echo "deps: apt does not serve xen-utils-4.17 $xen_pin (pinned in $lock): this harness" >&2
    echo "deps: needs Debian 12 (bookworm) with bookworm-security; if the pin is gone, move" >&2
    echo "deps: the pins on purpose (images/README.md, 'Moving the pins')" >&2
    exit 1
fi
echo "deps: done"
