#!/usr/bin/env bash
# Makes a GRUB EFI application that boots a stordom ELF through its
# multiboot2 entry: GRUB (from the pinned Debian packages, unpacked by
# images/build.py into cache/out/efi) with a memory disk holding stordom,
# its command line and its boot modules. OVMF starts it (bare QEMU:
# qemu.sh with BOOT=efi; an HVM guest: xl's `kernel=`).
# usage: efi.sh KERNEL_ELF OUT_EFI "CMDLINE" [MODULE...]
set -euo pipefail
kernel=${1:?usage: efi.sh KERNEL_ELF OUT_EFI CMDLINE [MODULE...]}
out=${2:?usage: efi.sh KERNEL_ELF OUT_EFI CMDLINE [MODULE...]}
cmdline=${3:-}
shift 3 || shift $#
here=$(cd "$(dirname "$0")" && pwd)
efi=${STORDOM_IMAGES_CACHE:-$here/../cache}/out/efi
[ -x "$efi/grub-mkimage" ] || { echo "efi.sh: $efi/grub-mkimage missing: run 'make images'" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/boot/grub"
cp "$kernel" "$work/boot/stordom"
{
    echo "set timeout=0"
    # Text mode: stordom has no use for a framebuffer.
    echo "set gfxpayload=text"
    echo "multiboot2 /boot/stordom $cmdline"
    n=0
    for m in "$@"; do
        cp "$m" "$work/boot/module$n"
        echo "module2 /boot/module$n module$n"
        n=$((n + 1))
    done
    echo "boot"
} >"$work/boot/grub/grub.cfg"
printf 'set root=(memdisk)\nset prefix=(memdisk)/boot/grub\n' >"$work/early.cfg"
tar -C "$work" -cf "$work/memdisk.tar" boot
"$efi/grub-mkimage" -O x86_64-efi -d "$efi/x86_64-efi" -p '(memdisk)/boot/grub' \
    -c "$work/early.cfg" -m "$work/memdisk.tar" -o "$out" \
    memdisk tar multiboot2 normal configfile boot
