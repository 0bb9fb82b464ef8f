#!/usr/bin/env bash
# Boots a stordom ELF under bare QEMU (no Xen): through its PVH entry
# (QEMU's -kernel), or with BOOT=efi through its multiboot2 entry, loaded
# by GRUB's EFI image under OVMF (efi.sh; MODULES names its boot modules).
# usage: qemu.sh KERNEL_ELF [extra qemu args...]
# env:   CMDLINE (kernel command line), MEM (default 256M), TIMEOUT (s, default 60),
#        BOOT (pvh or efi, default pvh), MODULES (efi: space-separated files)
# Exit status is QEMU's: 33 = stordom exited successfully, 35 = failure
# (isa-debug-exit maps code N to (N << 1) | 1), 124 = timed out.
set -euo pipefail
kernel=${1:?usage: qemu.sh KERNEL_ELF [qemu args...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
case ${BOOT:-pvh} in
    pvh) boot=(-kernel "$kernel" -append "${CMDLINE:-}") ;;
    efi)
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        # shellcheck disable=SC2086 # MODULES is a list of paths
        "$here/efi.sh" "$kernel" "$work/stordom.efi" "${CMDLINE:-}" ${MODULES:-}
        boot=(-bios "${STORDOM_IMAGES_CACHE:-$here/../cache}/out/efi/OVMF.fd" -kernel "$work/stordom.efi") ;;
    *) echo "qemu.sh: BOOT must be pvh or efi" >&2; exit 2 ;;
esac
accel=tcg
timeout --foreground "${TIMEOUT:-60}" qemu-system-x86_64 \
    -machine q35,accel=$accel -cpu max -smp 1 -m "${MEM:-256M}" \
    -display none -serial stdio -monitor none -no-reboot -net none \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    "${boot[@]}" "$@"
