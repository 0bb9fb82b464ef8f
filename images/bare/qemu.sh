#!/usr/bin/env bash
# Boots a stordom ELF under bare QEMU (no Xen) through its PVH entry.
# usage: qemu.sh KERNEL_ELF [extra qemu args...]
# env:   CMDLINE (kernel command line), MEM (default 256M), TIMEOUT (s, default 60)
# Exit status is QEMU's: 33 = stordom exited successfully, 35 = failure
# (isa-debug-exit maps code N to (N << 1) | 1), 124 = timed out.
set -euo pipefail
kernel=${1:?usage: qemu.sh KERNEL_ELF [qemu args...]}
shift
accel=tcg
exec timeout --foreground "${TIMEOUT:-60}" qemu-system-x86_64 \
    -machine q35,accel=$accel -cpu max -smp 1 -m "${MEM:-256M}" \
    -display none -serial stdio -monitor none -no-reboot -net none \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -kernel "$kernel" -append "${CMDLINE:-}" "$@"
