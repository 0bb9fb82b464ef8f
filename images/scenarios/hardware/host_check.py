#!/usr/bin/env python3
"""The hardware scenario's checks from the host, on the disk files QEMU
serves to stordom (run.py calls this with $DISKS and $RUN_DIR):

  prepare        before the first boot: namespace 1's MBR (partition 1),
                 and a pattern in the fences around its slices
  killed-boot1   QEMU was just killed (SIGKILL) after g5 and g6 printed
                 the md5 of data they made durable: it must be in the files
  end            the fences are unchanged; the second boot's guest g7
                 read back what g5 and g6 made durable

Prints RESULT lines (the run's "host" console)."""
import hashlib
import os
import re
import sys
import tomllib
from pathlib import Path

SECTOR = 512
HERE = Path(__file__).resolve().parent
ENV = tomllib.loads((HERE / "scenario.toml").read_text())["env"]
DISKS = Path(os.environ["DISKS"])
RUN_DIR = Path(os.environ["RUN_DIR"])
NS1 = DISKS / "nvme-ns1.img"
AHCI = DISKS / "ahci.img"


def result(name: str, ok: bool, detail: str) -> None:
    print(f'RESULT name={name} status={"pass" if ok else "fail"} detail="{detail}"')


def range_of(target: str) -> tuple[int, int]:
    """(first sector, sectors) of "DISK@START+COUNT" or "START+COUNT"."""
    start, count = target.split("@")[-1].split("+")
    return int(start), int(count)


def fence_bytes(start: int, count: int) -> bytes:
    return b"".join(f"stordom fence sector {s:>10}\n".encode().ljust(SECTOR, b"#")
                    for s in range(start, start + count))


def fences() -> list[tuple[int, int]]:
    return [range_of(f) for f in ENV["FENCES"].split()]


def mbr() -> bytes:
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + int(ENV["P1_START"]).to_bytes(4, "little") \
        + int(ENV["P1_SECTORS"]).to_bytes(4, "little")
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def prepare() -> None:
    with open(NS1, "r+b") as f:
        f.write(mbr())
        for start, count in fences():
            f.seek(start * SECTOR)
            f.write(fence_bytes(start, count))
    print(f"prepared {NS1.name}: MBR with p1 {ENV['P1_START']}+{ENV['P1_SECTORS']}, fences {ENV['FENCES']}")


def md5_line(log: str, prefix: str) -> tuple[int, int, str] | None:
    """(offset, bytes, md5) of the first line of console `log` that has
    `prefix` before "offset=... bytes=... md5=..."."""
    path = RUN_DIR / log
    text = path.read_text(errors="replace") if path.exists() else ""
    m = re.search(rf"{prefix} offset=(\d+) bytes=(\d+) md5=([0-9a-f]{{32}})", text)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def durable(guest: str) -> tuple[int, int, str] | None:
    """What `guest` made durable on its xvda, as dom0 copied its line
    before the power cut."""
    return md5_line("dom0.log", rf"\[dom0\] {guest} DURABLE disk=xvda")


def found(disk: str) -> tuple[int, int, str] | None:
    """What the second boot's guest g7 read on `disk`."""
    return md5_line("guest-g7.log", f"FOUND disk={disk}")


# Where each durable guest's xvda lives on the host: (file, byte offset).
DURABLE_DISKS = {
    "g5": (NS1, range_of(ENV["RANGE_TARGET"])[0] * SECTOR),
    "g6": (AHCI, 0),
}
# The second boot's guest g7 has the same two disks as xvda and xvdb.
FOUND_DISKS = {"g5": "xvda", "g6": "xvdb"}


def durable_on_host() -> None:
    for guest, (path, base) in DURABLE_DISKS.items():
        got = durable(guest)
        if got is None:
            result("durable-on-host", False, f"{guest} printed no DURABLE line")
            continue
        offset, length, md5 = got
        on_host = hashlib.md5(read(path, base + offset, length)).hexdigest()
        result("durable-on-host", on_host == md5,
               f"{guest}: {length} bytes at {base + offset} of {path.name}: md5 {on_host}, "
               f"the guest wrote {md5}")


def end() -> None:
    bad = [f"{s}+{n}" for s, n in fences() if read(NS1, s * SECTOR, n * SECTOR) != fence_bytes(s, n)]
    if read(NS1, 0, SECTOR) != mbr():
        bad.append("the MBR")
    result("fences", not bad, "changed: " + ", ".join(bad) if bad else
           f"{ENV['FENCES']} and the MBR of {NS1.name} unchanged")
    for guest, disk in FOUND_DISKS.items():
        wrote, got = durable(guest), found(disk)
        result("durable-found", wrote is not None and got is not None and wrote == got,
               f"{guest} wrote {wrote}, g7 found {got} on {disk}")


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else ""
    if phase == "prepare":
        prepare()
    elif phase == "killed-boot1":
        durable_on_host()
    elif phase == "end":
        end()
    else:
        print(f"host_check.py: nothing to do for phase {phase!r}")
