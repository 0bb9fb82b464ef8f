#!/usr/bin/env python3
"""Bare-QEMU boot tests of the stordom ELF, plus checks on the ELF itself.

usage: boot.py KERNEL_ELF
Each case boots the kernel with a command line and asserts on the console
output and on QEMU's exit status (33 = success, 35 = failure): through the
PVH entry (QEMU's -kernel), and through the multiboot2 entry as GRUB's EFI
image loads it under OVMF (images/bare/efi.sh; needs `make images`).
"""
import os
import re
import subprocess
import sys
import tempfile
import time

from qemu_disks import EXPECTED, disk_args

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(HERE, "..", "images", "bare", "qemu.sh")
SUCCESS, FAILURE = 33, 35
MAX_ELF_BYTES = 1 << 20

results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f": {detail}"), flush=True)


def boot(kernel, cmdline="", mem="256M", extra=(), efi_modules=None):
    """Boots by PVH, or by GRUB's multiboot2 under OVMF when efi_modules
    (a list, maybe empty) is given."""
    env = dict(os.environ, CMDLINE=cmdline, MEM=mem, TIMEOUT="60",
               BOOT="pvh" if efi_modules is None else "efi", MODULES=" ".join(efi_modules or []))
    start = time.monotonic()
    p = subprocess.run([LAUNCHER, kernel, *extra], env=env, capture_output=True, text=True, errors="replace")
    return p.returncode, p.stdout + p.stderr, time.monotonic() - start


def boot_case(kernel, name, cmdline, status, patterns, mem="256M", extra=(), absent=(),
              efi_modules=None):
    code, out, secs = boot(kernel, cmdline, mem, extra, efi_modules)
    missing = [p for p in patterns if not re.search(p, out)]
    unwanted = [p for p in absent if re.search(p, out)]
    ok = code == status and not missing and not unwanted
    detail = f"exit {code} (want {status}), missing {missing}, unwanted {unwanted}\n--- console ---\n{out[-3000:]}"
    check(f"boot {name} ({secs:.2f}s)", ok, detail)
    return out, secs


def elf_checks(kernel):
    size = os.path.getsize(kernel)
    print(f"ELF size: {size} bytes ({size / 1024:.1f} KiB)")
    check("ELF under 1 MiB", size < MAX_ELF_BYTES, f"{size} bytes")

    disasm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", kernel], capture_output=True, text=True).stdout
    red_zone = [line for line in disasm.splitlines() if re.search(r"-0x[0-9a-f]+\(%rsp\)", line)]
    check("no red-zone stack accesses", not red_zone and "interrupt_common" in disasm, "\n".join(red_zone[:10]))

    phdrs = subprocess.run(["readelf", "-lW", kernel], capture_output=True, text=True).stdout
    loads = [line.split() for line in phdrs.splitlines() if line.strip().startswith("LOAD")]
    wx = [l for l in loads if "W" in l[-2] and "E" in l[-2]]
    check("no writable+executable segment", loads and not wx, f"{wx}")

    notes = subprocess.run(["readelf", "-nW", kernel], capture_output=True, text=True).stdout
    check("Xen PVH entry note present", re.search(r"Xen\s+0x00000008\s+Unknown note type: \(0x00000012\)", notes) is not None, notes)

    # Multiboot2 header: 8-aligned in the file's first 32 KiB, checksum 0.
    with open(kernel, "rb") as f:
        head = f.read(32768)
    found = [at for at in range(0, len(head) - 16, 8)
             if int.from_bytes(head[at:at + 4], "little") == 0xE85250D6]
    words = [int.from_bytes(head[found[0] + 4 * i:found[0] + 4 * i + 4], "little") for i in range(4)] if found else []
    check("multiboot2 header in the first 32 KiB", bool(found) and sum(words) % (1 << 32) == 0, f"{found} {words}")


def main():
    kernel = sys.argv[1]
    elf_checks(kernel)

    out, secs = boot_case(kernel, "default", "", SUCCESS, [
        r"stordom \S+ \(PVH boot, start_info v1",
        r"memory map \(\d+ entries\)",
        r"0x000000100000-0x00000ffdf000 Ram",
        r"modules \(0\)",
        r"W\^X ok",
        r"NX on",
        r"clock: TSC \d+\.\d+ MHz",
        r"apic: x?x?APIC timer \d+ ticks/ms",
        r"timer: 10 ms sleep took 1\d\.\d+ ms, [1-9]\d* interrupt",
        r"boot complete in \d+ us",
    ])
    print(f"boot-to-exit under QEMU (wall clock, default case): {secs:.2f}s")

    with tempfile.NamedTemporaryFile(suffix=".img") as module:
        module.write(os.urandom(3 * 4096 + 100))
        module.flush()
        boot_case(kernel, "with module and command line", "loglevel=debug colour=blue", SUCCESS, [
            r'command line: "loglevel=debug colour=blue"',
            r'ignoring "colour=blue"',
            r"modules \(1\):",
            r"module 0: 0x[0-9a-f]+\+0x3064 ",
        ], extra=["-initrd", module.name])

    boot_case(kernel, "6 GiB (RAM above 4 GiB mapped and checked)", "", SUCCESS, [
        r"0x000100000000-0x000200000000 Ram",
        r"RAM checked up to 0x1ffffffff",
    ], mem="6G")

    boot_case(kernel, "loglevel=error is quiet", "loglevel=error", SUCCESS, [], absent=[r"INFO", r"WARN"])

    regs = r"RIP 0x[0-9a-f]{16}[\s\S]*CR2 0x[0-9a-f]{16}[\s\S]*RAX[\s\S]*stack at 0x"
    boot_case(kernel, "fault=pagefault", "fault=pagefault", FAILURE, [
        r"FATAL: exception 14 \(page fault\) error code 0x0\b", r"CR2 0x00007fffdead0000", regs,
        r"stack at 0x[0-9a-f]+:\n\s+0x[0-9a-f]+: 0x[0-9a-f]{16} 0x[0-9a-f]{16}",
    ])
    boot_case(kernel, "fault=panic", "fault=panic", FAILURE, [
        r"PANIC: panicked at kernel/src/main\.rs:\d+:\d+:\npanic requested on the command line",
        r"stack at 0x[0-9a-f]+:\n\s+0x[0-9a-f]+: 0x[0-9a-f]{16}",
    ])
    boot_case(kernel, "fault=ud", "fault=ud", FAILURE, [r"FATAL: exception 6 \(invalid opcode\)", regs])
    boot_case(kernel, "fault=stackoverflow hits the guard page", "fault=stackoverflow", FAILURE, [
        r"FATAL: exception 14 \(page fault\) error code 0x2\b", regs, r"<not mapped>",
    ])
    boot_case(kernel, "fault=iststackoverflow hits the interrupt stack's guard page",
              "fault=iststackoverflow", FAILURE, [
        r"FATAL: exception 14 \(page fault\) error code 0x2\b", regs, r"<not mapped>",
    ])
    boot_case(kernel, "fault=nestedinterrupt is caught by the IST nesting check",
              "fault=nestedinterrupt", FAILURE, [
        r"FATAL: vector 32 entered its IST stack while vector 32 was using it",
    ])

    with tempfile.TemporaryDirectory() as folder:
        out, secs = boot_case(kernel, "disk-selftest on NVMe (2 namespaces), AHCI and virtio-blk", "job=disk-selftest", SUCCESS, [
            r"pci: ECAM at 0x[0-9a-f]+",
            r"storage: 4 disk\(s\): " + " ".join(EXPECTED),
            *[rf"disk-selftest: {name}: PASS in \d+ ms \(1024 KiB in \d+ segments, unaligned 1\.5 KiB, "
              rf"last block 131071, beyond end refused" for name in EXPECTED],
            r"disk-selftest: nvme0n1: PASS .*write-zeroes, discard\)",
            r"disk-selftest: ahci0p0: PASS .*write-zeroes, discard\)",
            r"ahci0p0: 00:1f\.2, NCQ on",
            r"disk-selftest: 4 disk\(s\), 0 failed",
        ], extra=disk_args(folder))
        print(f"disk self-test wall clock: {secs:.2f}s")
    with tempfile.NamedTemporaryFile(suffix=".img") as module:
        module.write(os.urandom(3 * 4096 + 100))
        module.flush()
        out, secs = boot_case(kernel, "multiboot2 by GRUB's EFI image under OVMF, with a module",
                              "loglevel=debug colour=blue", SUCCESS, [
            r"stordom \S+ \(multiboot2 boot, information at 0x[0-9a-f]+, ACPI RSDP at 0x[0-9a-f]*[1-9a-f][0-9a-f]*\)",
            r'command line: "loglevel=debug colour=blue"',
            r"memory map \(\d+ entries\)",
            r"modules \(1\):",
            r'module 0: 0x[0-9a-f]+\+0x3064 "module0"',
            r"W\^X ok",
            r"NX on",
            r"boot complete in \d+ us",
        ], efi_modules=[module.name])
        print(f"firmware + GRUB + stordom to exit under QEMU (wall clock): {secs:.2f}s")
    with tempfile.TemporaryDirectory() as folder:
        boot_case(kernel, "disk-selftest by multiboot2 under OVMF (PCI found through the ACPI tables GRUB passes)",
                  "job=disk-selftest", SUCCESS, [
            r"pci: ECAM at 0x[0-9a-f]+",
            r"storage: 4 disk\(s\): " + " ".join(EXPECTED),
            r"disk-selftest: 4 disk\(s\), 0 failed",
        ], extra=disk_args(folder), efi_modules=[])
    boot_case(kernel, "disk-selftest without disks fails", "job=disk-selftest", FAILURE, [
        r"storage: 0 disk\(s\)", r"DiskSelftest failed",
    ])

    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
