#!/usr/bin/env python3
"""Bare-QEMU disk benchmark: boots stordom with job=disk-bench on the
emulated NVMe, AHCI and virtio-blk disks and prints its table.

usage: bench.py KERNEL_ELF
"""
import os
import subprocess
import sys
import tempfile

from qemu_disks import disk_args

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(HERE, "..", "images", "bare", "qemu.sh")


def main():
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, CMDLINE="job=disk-bench", TIMEOUT="300")
        p = subprocess.run([LAUNCHER, sys.argv[1], *disk_args(folder)], env=env,
                           capture_output=True, text=True, errors="replace")
    rows = [line.split("disk-bench: ", 1)[1] for line in p.stdout.splitlines() if "disk-bench: " in line]
    print("bare QEMU (TCG) disk benchmark, stordom drivers:")
    print("\n".join(rows))
    if p.returncode != 33:
        print(p.stdout[-3000:])
        sys.exit(f"disk-bench failed (QEMU status {p.returncode})")


if __name__ == "__main__":
    main()
