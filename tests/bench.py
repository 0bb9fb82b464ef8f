#!/usr/bin/env python3
"""Bare-QEMU disk benchmark: boots stordom with job=disk-bench on the
emulated NVMe, AHCI and virtio-blk disks and prints its table.

usage: bench.py KERNEL_ELF [--json FILE]   (FILE: {device: {column: value}})
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from qemu_disks import disk_args

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(HERE, "..", "images", "bare", "qemu.sh")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel")
    ap.add_argument("--json", help="write the table here too")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, CMDLINE="job=disk-bench", TIMEOUT="300")
        p = subprocess.run([LAUNCHER, a.kernel, *disk_args(folder)], env=env,
                           capture_output=True, text=True, errors="replace")
    rows = [line.split("disk-bench: ", 1)[1] for line in p.stdout.splitlines() if "disk-bench: " in line]
    print("bare QEMU (TCG) disk benchmark, stordom drivers:")
    print("\n".join(rows))
    if a.json:
        header, *devices = [r.split() for r in rows if not r.startswith("each case")]
        table = {d[0]: {col: int(v) for col, v in zip(header[1:], d[1:]) if v.isdigit()}
                 for d in devices}
        with open(a.json, "w") as f:
            json.dump(table, f, indent=1)
    if p.returncode != 33:
        print(p.stdout[-3000:])
        sys.exit(f"disk-bench failed (QEMU status {p.returncode})")


if __name__ == "__main__":
    main()
