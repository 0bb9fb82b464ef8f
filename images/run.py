#!/usr/bin/env python3
"""Run a scenario: QEMU (TCG) -> Xen -> dom0 -> guests, collect every
console into a run folder, check the results.

Usage: run.py SCENARIO_DIR [--runs DIR] [--retries N] [--no-build] [--timeout S] [--env NAME=VALUE]

A scenario is a folder with scenario.toml (see images/README.md).  The run
folder (runs/<time>-<scenario>/ at the top of the repository, or $STORDOM_RUNS)
gets:
  serial.log          everything QEMU's serial port printed, timestamped
  xen.log             Xen's own lines
  dom0.log            dom0's console (kernel, /init, scenario script)
  guest-NAME.log      each domain's console (xenconsoled --log=guest)
  results.json        checks, metrics, milestones, verdict
  summary.txt         the summary printed at the end
  qemu.cmdline, qemu.stderr
Exit status 0 only if every check passed.  The last line printed is
"N passed, N failed".
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DONE_RE = re.compile(r"STORDOM-SCENARIO-DONE rc=(\d+)")
CON_RE = re.compile(r"^\[con:([A-Za-z0-9_.-]+)\] ?(.*)$")
KV_RE = re.compile(r'(\w[\w.:-]*)=("([^"]*)"|\S+)')
LINE_RE = re.compile(r"\b(RESULT|METRIC) (.*)$")
# A domain's debug-port (0xe9) output as Xen prints it: "(d1) ...".  stordom
# writes every log line there, so it reaches the serial line without dom0.
XEN_GUEST_RE = re.compile(r"^\(d(\d+)\) ")
# Xen prints its own lines and a domain's whole, but passes dom0's console
# writes straight through in pieces, so such a line can land inside a dom0
# line whose rest follows on the next serial line: "status=pass(d1) [..."
# once read as a failed check (CI, the nbd scenario's shutdown:g2).
XEN_SPLICED_RE = re.compile(r"\((?:XEN|d\d+)\) \[")

# stordom's heartbeat and watchdog (kernel/src/serve.rs), seen through Xen.
HEARTBEAT_RE = re.compile(r"^\(d(\d+)\) .*\bhb up=.*\boutstanding=(\d+)")
WATCHDOG_RE = re.compile(r"^\(d(\d+)\) .*\bwatchdog: ")
# dom0's /init heartbeat and its answer to a diagnosis request.
DOM0_HB_RE = re.compile(r"^\[dom0\] hb up=")
DIAG_DONE = "STORDOM-DIAG-DONE"
TRIPLE_FAULT_RE = re.compile(r"d\d+v\d+ Triple fault")
# The first line of Xen's dump of the faulted vCPU ("RIP:    0008:[<...>]").
DUMP_RIP_RE = re.compile(r"RIP:\s+([0-9a-f]{4}):\[<([0-9a-f]+)>\]")
# Xen's own code selector. A guest's saved state holding it (with Xen's
# RIP, stack and CR3) was written by the emulator's SVM world switch, not
# by anything the guest ran: ../shared/notes/xen-in-qemu.md.
XEN_CODE_SELECTOR = "e008"
# Descriptor-table registers in dom0's `xen-hvmctx` of the faulted domain
# (the diagnosis after a triple fault): "idtr (0xffff82d040577000 + 0x0fff)".
HVMCTX_TABLE_RE = re.compile(r"diag:\s+(idtr|gdtr)\s+\((0x[0-9a-f]+)")
# The event being injected in that saved state ("event 0x80000b0e error
# 0x00000010": valid, hardware exception, vector 14, error code), and
# xenctx's look at the code at the saved RIP, through the domain's own page
# tables ("Code (instr addr 011a2288)", then the bytes, RIP's in <..>).
HVMCTX_EVENT_RE = re.compile(r"diag:\s+event (0x[0-9a-f]+) error (0x[0-9a-f]+)")
XENCTX_CODE_RE = re.compile(r"diag: Code \(instr addr ([0-9a-f]+)\)")
XENCTX_BYTES_RE = re.compile(r"diag: (?:[0-9a-f]{2} )*<[0-9a-f]{2}>")
PF_VECTOR, PF_PRESENT, PF_FETCH = 14, 0x1, 0x10
# Xen's own image (text, data, its IDT and GDT) lives at 0xffff82d0........:
# stordom never loads a table there, so a saved IDTR or GDTR pointing there
# came from the emulator's world switch too.
XEN_IMAGE_PREFIX = 0xffff82d0
# How long every console may stay silent before a timed-out machine counts
# as frozen (dom0 beats every 10 s).
SILENT_S = 45
# Verdicts that blame the emulator, with evidence: such attempts are rerun.
RERUN_VERDICTS = ("emulator-suspect", "machine-frozen")

# Signs that the emulator (QEMU TCG running Xen running guests) misbehaved
# rather than the code under test: see ../shared/notes/xen-in-qemu.md.
SUSPECT_PATTERNS = [
    r"segfault at", r"Segmentation fault", r"general protection fault",
    r"traps: .* trap ", r"invalid opcode", r"\bOops\b", r"BUG: ", r"Kernel panic",
    r"[Tt]riple fault", r"stack smashing", r"double free", r"malloc\(\)",
    r"corrupted size", r"free\(\): invalid", r"FATAL TRAP", r"Panic on CPU",
    r"domain_crash", r"\bcrashed\b", r"Insn len emulation failed",
    r"unhandled (page fault|exception)", r"Bad RIP",
]
SUSPECT_RE = re.compile("|".join(f"(?:{p})" for p in SUSPECT_PATTERNS))

DEFAULTS = {
    "timeout": 280,
    "qemu_mem": 3072,
    "qemu_smp": 2,
    "qemu_cpu": "max,-smap,-fsgsbase",
    # One host thread runs both vCPUs in turn: with multi-threaded TCG
    # stordom (under the emulated SVM) triple-faulted in most soak and
    # hostile attempts (images/README.md).
    "qemu_accel": "tcg,thread=single",
    "qemu_args": [],
    "xen_args": "xsave=0",
    "dom0_mem": "1024M",
    "dom0_vcpus": 1,
    "dom0_args": "",
    # dom0-hvm.cpio.gz for scenarios that start HVM guests (device model).
    "dom0_image": "dom0.cpio.gz",
    "script": "dom0.sh",
    # Disk images on the host for QEMU's own devices: {"NAME": MiB}, made
    # sparse and empty in the run folder's disks/ for each attempt; "{disks}"
    # in qemu_args names that folder.
    "host_disks": {},
    # A program run on the host with the disks, given its phase: "prepare"
    # (before the first boot), "killed-bootN" (QEMU was killed on request)
    # and "end"; its output is the "host" console.
    "host_check": "",
    # Boots of the same disks: a scenario that asks for QEMU to be killed
    # (KILL_MARK) is booted again, up to this many times.
    "boots": 1,
    # The machine of the hardware scenarios: PASSTHROUGH_ARGS, its disks,
    # and Xen with the IOMMU on.
    "passthrough": False,
}
# QEMU's emulated VT-d, and behind it the controllers stordom gets (dom0
# passes 00:05.0 and 00:06.0 through: lib.sh's STORDOM_PCI): an NVMe with
# two namespaces and an AHCI controller with one disk; an NVMe that dom0
# keeps, the reference for benchmarks; and an NVMe whose offline virtual
# function the hardware scenario passes as well (lib.sh's OFFLINE_VF_PF). Backed by files in the run
# folder's disks/ (PASSTHROUGH_DISKS, MiB).
PASSTHROUGH_ARGS = [
    "-device", "intel-iommu,intremap=on",
    "-drive", "file={disks}/nvme-ns1.img,if=none,id=stordom-ns1,format=raw",
    "-drive", "file={disks}/nvme-ns2.img,if=none,id=stordom-ns2,format=raw",
    # mdts=9 (2 MiB a command) as in tests/bench.py's bare-QEMU disks.
    "-device", "nvme,id=stordom-nvme,serial=stordom-nvme,addr=0x5,mdts=9",
    "-device", "nvme-ns,drive=stordom-ns1,bus=stordom-nvme,nsid=1",
    "-device", "nvme-ns,drive=stordom-ns2,bus=stordom-nvme,nsid=2",
    "-drive", "file={disks}/ahci.img,if=none,id=stordom-sata,format=raw",
    "-device", "ahci,id=stordom-ahci,addr=0x6",
    "-device", "ide-hd,drive=stordom-sata,bus=stordom-ahci.0",
    "-drive", "file={disks}/dom0-nvme.img,if=none,id=dom0-ns,format=raw",
    "-device", "nvme,serial=dom0-nvme,drive=dom0-ns,addr=0x7,mdts=9",
    # A controller that cannot come up, for the hardware scenario: an NVMe
    # with one SR-IOV virtual function (00:08.1), which dom0 enables and
    # passes to stordom without ever bringing it online (QEMU's VF then
    # reads every register but CSTS as 0 and refuses CC.EN). SR-IOV needs
    # a subsystem; function 0 must say multifunction for the VF at .1.
    "-device", "nvme-subsys,id=offline-vf-subsys,nqn=stordom-offline-vf",
    "-device", "nvme,serial=offline-vf-pf,subsys=offline-vf-subsys,addr=0x8,multifunction=on,"
               "sriov_max_vfs=1,sriov_vq_flexible=2,sriov_vi_flexible=1",
]
PASSTHROUGH_DISKS = {"nvme-ns1.img": 512, "nvme-ns2.img": 256, "ahci.img": 256, "dom0-nvme.img": 512}
# A line (on any console) asking the runner to SIGKILL QEMU at once: the
# durability checks' power cut.
KILL_MARK = "STORDOM-KILL-QEMU"
DISK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_xen_line(text: str) -> bool:
    """Xen's own line, or a domain's debug-port line as Xen prints it."""
    return text.startswith("(XEN)") or XEN_GUEST_RE.match(text) is not None


def log(msg: str) -> None:
    print(f"[run] {msg}", flush=True)


def die(msg: str, code: int = 2) -> None:
    print(f"[run] ERROR: {msg}", file=sys.stderr, flush=True)
    print("0 passed, 1 failed")
    sys.exit(code)


# ---- scenario ---------------------------------------------------------------
class Scenario:
    def __init__(self, path: Path):
        self.dir = path.resolve()
        f = self.dir / "scenario.toml"
        if not f.exists():
            die(f"{f} not found (a scenario is a folder with scenario.toml)")
        try:
            raw = tomllib.loads(f.read_text())
        except tomllib.TOMLDecodeError as e:
            die(f"{f}: {e}")
        self.name = raw.get("name", self.dir.name)
        self.cfg = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS}}
        if self.cfg["passthrough"]:
            self.cfg["qemu_args"] = PASSTHROUGH_ARGS + self.cfg["qemu_args"]
            self.cfg["host_disks"] = {**PASSTHROUGH_DISKS, **self.cfg["host_disks"]}
            self.cfg["xen_args"] += " iommu=1"
        self.description = raw.get("description", "")
        self.env = {k: str(v) for k, v in raw.get("env", {}).items()}
        self.checks = raw.get("check", [])
        self.files: dict[str, Path] = {}
        for dest, src in raw.get("files", {}).items():
            exp = os.path.expandvars(str(src))
            if "$" in exp:
                die(f"scenario {self.name}: file {dest}: {src} names an unset variable")
            p = (self.dir / exp).resolve()
            if not p.is_file():
                die(f"scenario {self.name}: file {dest}: {p} does not exist")
            self.files[dest] = p
        if not (self.dir / self.cfg["script"]).exists():
            die(f"scenario {self.name}: script {self.cfg['script']} not found")
        for disk, mib in self.cfg["host_disks"].items():
            if not DISK_NAME_RE.match(disk) or not isinstance(mib, int) or mib <= 0:
                die(f"scenario {self.name}: host_disks: {disk} = {mib!r} (want a file name = MiB)")
        if self.cfg["host_check"] and not (self.dir / self.cfg["host_check"]).is_file():
            die(f"scenario {self.name}: host_check {self.cfg['host_check']} not found")
        for c in self.checks:
            if "console" not in c or not any(k in c for k in ("grep", "absent", "result", "metrics",
                                                              "informational")):
                die(f"scenario {self.name}: check {c} needs console and one of "
                    "grep/absent/result/metrics/informational")


RIP_RE = re.compile(r"diag: rip: ([0-9a-f]{16})")


def symbolize(addr: int) -> str:
    """'0x117903 stordom::serve::run+0x1c3' from $STORDOM_ELF's symbols."""
    name = ""
    elf = os.environ.get("STORDOM_ELF")
    if elf and Path(elf).is_file():
        try:
            out = subprocess.run(["nm", "-n", "--demangle", elf], capture_output=True,
                                 text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        end = 0
        for line in out.splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[1] in "tTwW" and int(parts[0], 16) <= addr:
                name = f" {parts[2]}+{addr - int(parts[0], 16):#x}"
            if len(parts) == 3 and parts[2] == "__kernel_end":
                end = int(parts[0], 16)
        if end and addr >= end:
            # Outside the image: most often the hypercall page, a frame of
            # its own (32 bytes per hypercall: sched_op is 29).
            name = f" (outside the image; if in the hypercall page: hypercall {(addr & 0xfff) // 32})"
    return f"{addr:#x}{name}"


# ---- dom0 overlay -------------------------------------------------------------
def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """entries: (path, mode, data); directories have mode 0o040755."""
    out = io.BytesIO()
    ino = 1000

    def hdr(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        out.write(nb)
        out.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))
        ino += 1

    for name, mode, data in entries:
        hdr(name, mode, data)
    hdr("TRAILER!!!", 0, b"")
    return out.getvalue()


def build_overlay(sc: Scenario) -> bytes:
    entries: list[tuple[str, int, bytes]] = []
    dirs: set[str] = set()

    def add_dirs(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in dirs:
                dirs.add(d)
                entries.append((d, 0o040755, b""))

    def add(dest: str, src: Path | None, data: bytes | None = None) -> None:
        dest = dest.lstrip("/")
        add_dirs(dest)
        if data is None:
            data = src.read_bytes()
            mode = 0o100000 | (src.stat().st_mode & 0o777)
        else:
            mode = 0o100644
        entries.append((dest, mode, data))

    for p in sorted(sc.dir.rglob("*")):
        if p.is_file():
            add(f"scenario/{p.relative_to(sc.dir)}", p)
    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sc.env.items())
    env += f"export SCENARIO={shlex.quote(sc.name)}\n"
    add("scenario/env.sh", None, env.encode())
    if sc.cfg["script"] != "dom0.sh":
        add("scenario/dom0.sh", sc.dir / sc.cfg["script"])
    for dest, src in sc.files.items():
        add(dest, src)
    return gzip.compress(cpio_newc(entries), mtime=0)


# ---- one attempt --------------------------------------------------------------
class Attempt:
    def __init__(self, sc: Scenario, out: Path, images: Path, timeout: int):
        self.sc, self.out, self.images, self.timeout = sc, out, images, timeout
        self.t0 = 0.0
        self.lines: dict[str, list[tuple[float, str]]] = {}
        self.files: dict[str, io.TextIOWrapper] = {}
        self.done_rc: int | None = None
        self.done = threading.Event()
        self.milestones: dict[str, float] = {}
        self.diagnosis: dict = {}
        self.triple_fault_at: float | None = None
        self.killed_boot = 0
        self.unfinished = ""  # a dom0 line cut by a spliced Xen line

    def console_file(self, con: str):
        if con not in self.files:
            self.files[con] = open(self.out / f"{con}.log", "w", buffering=1)
            self.lines[con] = []
        return self.files[con]

    def record(self, con: str, t: float, text: str) -> None:
        self.console_file(con).write(f"[{t:8.3f}] {text}\n")
        self.lines[con].append((t, text))

    def milestone(self, name: str, t: float) -> None:
        self.milestones.setdefault(name, round(t, 1))

    def reader(self, stream, p: subprocess.Popen, boot: int) -> None:
        serial = open(self.out / "serial.log", "a", buffering=1)
        for raw in iter(stream.readline, b""):
            t = time.monotonic() - self.t0
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n").replace("\r", "")
            serial.write(f"[{t:8.3f}] {text}\n")
            if KILL_MARK in text and self.killed_boot != boot:
                # The power cut: nothing of the machine may run on, so
                # here, before anything else is read.
                p.kill()
                self.killed_boot = boot
                self.milestone(f"qemu_killed_boot{boot}", t)
            for piece in self.unsplice(text):
                self.route(t, piece)
        if self.unfinished:
            self.route(time.monotonic() - self.t0, self.unfinished)
        serial.close()
        self.done.set()

    def unsplice(self, text: str) -> list[str]:
        """The whole lines in one serial line: a Xen line spliced into a
        dom0 line is its own, and the dom0 line's start waits for its rest."""
        if is_xen_line(text):
            return [text]
        m = XEN_SPLICED_RE.search(text, 1)
        if m:
            self.unfinished += text[:m.start()]
            return [text[m.start():]]
        whole, self.unfinished = self.unfinished + text, ""
        return [whole]

    def route(self, t: float, text: str) -> None:
        """Files one console line under its console and notes milestones."""
        m = CON_RE.match(text)
        if is_xen_line(text):
            self.milestone("xen_first_line", t)
            self.record("xen", t, text)
            if TRIPLE_FAULT_RE.search(text) and self.triple_fault_at is None:
                # The attempt fails whatever follows (evaluate): end
                # it now rather than at the timeout.
                self.triple_fault_at = t
                self.done.set()
        elif m:
            con = m.group(1)
            self.record(con, t, m.group(2))
            self.milestone(f"{con}_first_line", t)
            if "STORDOM-GUEST-DONE" in m.group(2):
                self.milestone(f"{con}_done", t)
        else:
            self.record("dom0", t, text)
            if "Linux version" in text:
                self.milestone("dom0_kernel_start", t)
            if "STORDOM-DOM0-READY" in text:
                self.milestone("dom0_ready", t)
            d = DONE_RE.search(text)
            if d:
                self.milestone("scenario_done", t)
                self.done_rc = int(d.group(1))
                self.done.set()

    def qemu_cmd(self, initrd: Path, boot: int) -> list[str]:
        c = self.sc.cfg
        xen_args = (f"console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all "
                    f"console_timestamps=boot noreboot dom0_mem={c['dom0_mem']},max:{c['dom0_mem']} "
                    f"dom0_max_vcpus={c['dom0_vcpus']} {c['xen_args']}").strip()
        dom0_args = f"console=hvc0 earlyprintk=xen rdinit=/init {c['dom0_args']}".strip()
        if c["boots"] > 1:
            dom0_args += f" stordom.boot={boot}"
        if "," in dom0_args:
            die("dom0_args must not contain commas (QEMU splits multiboot modules on them)")
        qemu = os.environ.get("STORDOM_QEMU", "qemu-system-x86_64")
        datadirs = [a for d in os.environ.get("STORDOM_QEMU_DATADIRS", "").split(":") if d
                    for a in ("-L", d)]
        return [qemu, *datadirs, "-machine", "q35", "-accel", c["qemu_accel"], "-cpu", c["qemu_cpu"],
                "-smp", str(c["qemu_smp"]), "-m", str(c["qemu_mem"]),
                "-display", "none", "-serial", "stdio", "-monitor", "none",
                "-no-reboot", "-net", "none",
                *(a.replace("{disks}", str(self.out / "disks")) for a in c["qemu_args"]),
                "-kernel", str(self.images / "xen.elf"), "-append", xen_args,
                "-initrd", f"{self.images / 'vmlinuz'} {dom0_args},{initrd}"]

    def run(self) -> None:
        work = Path(tempfile.mkdtemp(prefix="stordom-run-"))
        try:
            initrd = work / "dom0-initrd.cpio.gz"
            with open(initrd, "wb") as f:
                with open(self.images / self.sc.cfg["dom0_image"], "rb") as base:
                    shutil.copyfileobj(base, f)
                f.write(build_overlay(self.sc))
            self.t0 = time.monotonic()
            disks = self.out / "disks"
            shutil.rmtree(disks, ignore_errors=True)
            if self.sc.cfg["host_disks"]:
                disks.mkdir()
                for name, mib in self.sc.cfg["host_disks"].items():
                    with open(disks / name, "wb") as f:
                        f.truncate(mib << 20)
            self.host_check("prepare")
            for con in ("xen", "dom0"):
                self.console_file(con)
            boots = int(self.sc.cfg["boots"])
            for boot in range(1, boots + 1):
                if self.boot_once(initrd, boot) and boot < boots:
                    self.done.clear()
                    continue
                break
            self.elapsed = time.monotonic() - self.t0
            self.host_check("end")
        finally:
            for f in self.files.values():
                f.close()
            shutil.rmtree(work, ignore_errors=True)

    def boot_once(self, initrd: Path, boot: int) -> bool:
        """Runs QEMU until the scenario is done, the timeout (counted from
        the first boot) or a kill on the scenario's request; True for the
        kill."""
        cmd = self.qemu_cmd(initrd, boot)
        with open(self.out / "qemu.cmdline", "a") as f:
            f.write(shlex.join(cmd) + "\n")
        with open(self.out / "qemu.stderr", "ab") as err:
            try:
                p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            except FileNotFoundError:
                die(f"{cmd[0]} not found: run images/deps.sh (or fix $STORDOM_QEMU)")
            th = threading.Thread(target=self.reader, args=(p.stdout, p, boot), daemon=True)
            th.start()
            self.done.wait(max(0.0, self.t0 + self.timeout - time.monotonic()))
            self.timed_out = not self.done.is_set()
            if self.killed_boot == boot:
                p.wait()
                th.join(5)
                self.qemu_rc = p.returncode
                self.host_check(f"killed-boot{boot}")
                return True
            if (self.timed_out or self.triple_fault_at is not None) and p.poll() is None:
                # After a triple fault too: dom0's view of the dead
                # domain (kept where its config says on_reboot =
                # "preserve") is the fault's evidence.
                self.diagnose(p)
            if self.done_rc is not None:
                time.sleep(0.5)  # let the last lines arrive
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.qemu_rc = p.returncode
            th.join(5)
        return False

    def host_check(self, phase: str) -> None:
        """Runs the scenario's host_check with QEMU gone: its lines are the
        "host" console (RESULT lines count as checks)."""
        script = self.sc.cfg["host_check"]
        if not script:
            return
        env = {**os.environ, "DISKS": str(self.out / "disks"), "RUN_DIR": str(self.out)}
        try:
            r = subprocess.run([sys.executable, str(self.sc.dir / script), phase], env=env,
                               capture_output=True, text=True, timeout=300)
            out, status = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired:
            out, status = "", "timeout (300 s)"
        t = time.monotonic() - self.t0
        for text in out.splitlines():
            self.record("host", t, text)
        if status != 0:
            self.record("host", t, f"RESULT name=host-check:{phase} status=fail detail=\"exit {status}\"")

    # ---- diagnosis of a timed-out run ------------------------------------------
    def count(self, con: str) -> int:
        return len(self.lines.get(con, []))

    def wait_quiet(self, con: str, quiet: float, limit: float) -> None:
        """Wait until `con` printed nothing for `quiet` s (at most `limit` s)."""
        end = time.monotonic() + limit
        n, since = self.count(con), time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.5)
            if self.count(con) != n:
                n, since = self.count(con), time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def diagnose(self, p: subprocess.Popen) -> None:
        """Before killing a timed-out QEMU: note who was last heard from, ask
        dom0 for its view (xl list, xenstore, stordom's vCPU registers; see
        dom0/init) through its console, then switch the serial input to Xen
        and ask for its debug dumps (domains and vCPUs, event channels, run
        queues).  What answered decides the verdict (evaluate)."""
        d: dict = {"last_line": {c: round(ls[-1][0], 1) for c, ls in self.lines.items() if ls}}

        def send(data: bytes) -> bool:
            try:
                p.stdin.write(data)
                p.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

        n0 = self.count("dom0")
        send(b"\rstordom-diag\r")
        end = time.monotonic() + 40
        while time.monotonic() < end and not any(
                DIAG_DONE in text for _, text in self.lines.get("dom0", [])[n0:]):
            time.sleep(0.5)
        d["dom0_answered"] = any(DIAG_DONE in text for _, text in self.lines.get("dom0", [])[n0:])
        x0 = self.count("xen")
        send(b"\x01\x01\x01")  # CTRL-a three times: serial input to Xen
        time.sleep(1)
        for key in b"qer":
            send(bytes([key]))
            self.wait_quiet("xen", 2, 20)
        d["xen_answered"] = self.count("xen") > x0
        d["t"] = round(time.monotonic() - self.t0, 1)  # the end of the diagnosis
        # Lines that came during the diagnosis count too: a dom0 still
        # beating while it is slow to answer is no frozen machine.
        d["last_line"] = {c: round(ls[-1][0], 1) for c, ls in self.lines.items() if ls}
        d["stordom_rip"] = [symbolize(int(m.group(1), 16)) for _, text in self.lines.get("dom0", [])[n0:]
                            if (m := RIP_RE.search(text))]
        self.diagnosis = d

    # ---- verdict ------------------------------------------------------------------
    def triple_fault_state(self, line: int) -> tuple[str, list[str]]:
        """What Xen's dump after the triple fault at xen.log line `line`
        shows: ("emulator", evidence) if the guest's saved state is Xen's
        own, else ("domain", evidence) with the RIP symbolized."""
        xen = self.lines.get("xen", [])
        head = xen[line - 1][1] if 0 < line <= len(xen) else ""
        for _, text in xen[line:line + 12]:
            if m := DUMP_RIP_RE.search(text):
                cs, rip = m.group(1), int(m.group(2), 16)
                if cs == XEN_CODE_SELECTOR:
                    return "emulator", [
                        f"xen.log:{line}: {head[:100]}",
                        f"the dump is Xen's own state (cs {cs}, RIP {rip:#x}), which no guest "
                        f"can load: the emulator's SVM world switch"]
                xen_tables = [f"{name} {base:#x}" for name, base in self.saved_tables()
                              if base >> 32 == XEN_IMAGE_PREFIX]
                if xen_tables:
                    return "emulator", [
                        f"xen.log:{line}: {head[:100]}",
                        f"RIP {symbolize(rip)} (cs {cs}), but the saved {', '.join(xen_tables)} "
                        f"(dom0's xen-hvmctx) are Xen's own tables: the emulator's SVM world switch"]
                if self.fetch_fault_on_mapped_code(rip):
                    return "emulator", [
                        f"xen.log:{line}: {head[:100]}",
                        f"RIP {symbolize(rip)} (cs {cs}): the saved state injects a not-present "
                        f"instruction-fetch page fault there, yet after the fault dom0's xenctx read "
                        f"the code at that RIP through the domain's own page tables (present, "
                        f"unchanged: no code of the domain ran in between): the emulator's page walk"]
                return "domain", [f"xen.log:{line}: {head[:100]}",
                                  f"the domain's own state: cs {cs}, RIP {symbolize(rip)}"]
        return "domain", [f"xen.log:{line}: {head[:100]}", "Xen's dump of its state was not captured"]

    def fetch_fault_on_mapped_code(self, rip: int) -> bool:
        """Whether the diagnosis shows a pending not-present instruction
        fetch #PF (xen-hvmctx) at `rip` while xenctx could read the code
        there through the domain's page tables."""
        dom0 = [text for _, text in self.lines.get("dom0", [])]
        fetch_fault = False
        for text in dom0:
            if m := HVMCTX_EVENT_RE.search(text):
                event, error = int(m.group(1), 16), int(m.group(2), 16)
                fetch_fault |= (event >> 31 == 1 and (event >> 8) & 7 == 3
                                and event & 0xff == PF_VECTOR
                                and error & PF_FETCH != 0 and error & PF_PRESENT == 0)
        code_read = any(
            (m := XENCTX_CODE_RE.search(text)) and int(m.group(1), 16) == rip
            and i + 1 < len(dom0) and XENCTX_BYTES_RE.search(dom0[i + 1])
            for i, text in enumerate(dom0))
        return fetch_fault and code_read

    def saved_tables(self) -> list[tuple[str, int]]:
        """IDTR and GDTR bases from the diagnosis's xen-hvmctx lines."""
        return [(m.group(1), int(m.group(2), 16)) for _, text in self.lines.get("dom0", [])
                if (m := HVMCTX_TABLE_RE.search(text))]

    def classify(self, failed: list, suspects: list) -> tuple[str, list[str]]:
        """pass; emulator-suspect (a fault signature on some console) or
        machine-frozen (timed out, nobody heard from and Xen deaf to its
        debug keys): both rerun; domain-fault (a triple fault in the
        domain's own state: no emulator signature, so ours until shown
        otherwise), stordom-stalled (its watchdog fired, or its heartbeat
        stopped while Xen still answered) or fail: not rerun."""
        if not failed:
            return "pass", []
        for s in suspects:
            if s["console"] == "xen" and TRIPLE_FAULT_RE.search(s["text"]):
                kind, evidence = self.triple_fault_state(s["line"])
                return ("emulator-suspect" if kind == "emulator" else "domain-fault"), evidence
        xen = self.lines.get("xen", [])
        watchdog = [(t, x) for t, x in xen if WATCHDOG_RE.match(x)]
        beats = [(t, int(m.group(2))) for t, x in xen if (m := HEARTBEAT_RE.match(x))]
        if suspects:
            s = suspects[0]
            return "emulator-suspect", [f"{s['console']}.log:{s['line']}: {s['text'][:120]}"]
        d = self.diagnosis
        if self.timed_out and d:
            last = max(d["last_line"].values(), default=0.0)
            silent = d["t"] - last
            if silent >= SILENT_S and not d["xen_answered"] and not d["dom0_answered"]:
                return "machine-frozen", [
                    f"no console line from anyone for {silent:.0f} s up to the end of the diagnosis "
                    f"(last: {', '.join(f'{c} {t} s' for c, t in sorted(d['last_line'].items()))})",
                    "neither Xen (debug keys q, e, r) nor dom0 (stordom-diag) answered"]
        if watchdog:
            t, x = watchdog[0]
            return "stordom-stalled", [f"xen.log: stordom's watchdog at {t:.1f} s: {x[:160]}"]
        if (self.timed_out and d and d["xen_answered"] and beats and beats[-1][1] > 0
                and d["t"] - beats[-1][0] > 30):
            return "stordom-stalled", [
                f"stordom's last heartbeat at {beats[-1][0]:.1f} s had {beats[-1][1]} requests "
                f"outstanding; none came in the {d['t'] - beats[-1][0]:.0f} s before the "
                f"timeout, while Xen still answered"]
        ev = []
        if self.timed_out and d:
            ev.append(f"Xen answered its debug keys: {d['xen_answered']}; "
                      f"dom0 answered stordom-diag: {d['dom0_answered']}; "
                      f"stordom's vCPUs at: {', '.join(d.get('stordom_rip', [])) or '-'}")
        return "fail", ev

    # ---- evaluation ---------------------------------------------------------
    def evaluate(self) -> dict:
        results = []   # (console, lineno, t, kv)
        metrics = []
        suspects = []
        for con, lines in self.lines.items():
            for i, (t, text) in enumerate(lines, 1):
                m = LINE_RE.search(text)
                if m:
                    kv = {k: (q if v.startswith('"') else v)
                          for k, v, q in KV_RE.findall(m.group(2))}
                    if m.group(1) == "RESULT" and "name" in kv and "status" in kv:
                        results.append({"console": con, "line": i, "t": round(t, 1), **kv})
                    elif m.group(1) == "METRIC" and "name" in kv and "value" in kv:
                        try:
                            kv["value"] = float(kv["value"])
                        except ValueError:
                            pass
                        metrics.append({"console": con, **kv})
                if SUSPECT_RE.search(text):
                    suspects.append({"console": con, "line": i, "text": text[:200]})

        checks = []

        def add(name, ok, where, detail=""):
            checks.append({"name": name, "status": "pass" if ok else "fail",
                           "where": where, "detail": detail})

        def logpath(con, line=None):
            return f"{self.out / (con + '.log')}" + (f":{line}" if line else "")

        # The run itself.
        if self.timed_out:
            add("scenario finished before the timeout", False, logpath("dom0"),
                f"no STORDOM-SCENARIO-DONE within {self.timeout} s")
        elif self.done_rc is None and self.triple_fault_at is not None:
            add("scenario finished", False, logpath("xen"),
                f"stopped at {self.triple_fault_at:.1f} s: a domain triple-faulted")
        else:
            add("scenario script exit status 0", self.done_rc == 0, logpath("dom0"),
                f"rc={self.done_rc}" if self.done_rc is not None else "QEMU exited early "
                f"(status {self.qemu_rc}, see qemu.stderr)")

        referenced = set()
        for c in self.sc.checks:
            con = c["console"]
            cons = list(self.lines) if con == "*" else [con]
            if c.get("informational"):
                # The console's RESULT lines are measurements the scenario
                # judges itself (e.g. a guest failing on a backend given
                # too little memory): kept in results.json, not checks.
                referenced.update((r["console"], r["line"]) for r in results if r["console"] in cons)
            pool = [(cn, i, t, text) for cn in cons for i, (t, text) in enumerate(self.lines.get(cn, []), 1)]
            if "result" in c:
                rs = [r for r in results if r["name"] == c["result"] and (con == "*" or r["console"] == con)]
                for r in rs:
                    referenced.add((r["console"], r["line"]))
                bad = [r for r in rs if r["status"] != "pass"]
                name = c.get("name", f"{con}: {c['result']} passed")
                if not rs:
                    add(name, False, logpath(cons[0]), f"no RESULT name={c['result']}")
                elif bad:
                    add(name, False, logpath(bad[0]["console"], bad[0]["line"]),
                        bad[0].get("detail", f"status={bad[0]['status']}"))
                else:
                    add(name, True, logpath(rs[0]["console"], rs[0]["line"]))
            if "grep" in c:
                rx = re.compile(c["grep"])
                hit = next(((cn, i) for cn, i, t, text in pool if rx.search(text)), None)
                add(c.get("name", f"{con}: /{c['grep']}/ seen"), hit is not None,
                    logpath(*hit) if hit else logpath(cons[0]),
                    "" if hit else f"no line matches /{c['grep']}/")
            if "absent" in c:
                rx = re.compile(c["absent"])
                hit = next(((cn, i, text) for cn, i, t, text in pool if rx.search(text)), None)
                add(c.get("name", f"{con}: /{c['absent']}/ absent"), hit is None,
                    logpath(hit[0], hit[1]) if hit else logpath(cons[0]),
                    hit[2][:120] if hit else "")
            if "metrics" in c:
                have = {m["name"] for m in metrics if con == "*" or m["console"] == con}
                miss = [m for m in c["metrics"] if m not in have]
                add(c.get("name", f"{con}: metrics recorded"), not miss, logpath(cons[0]),
                    f"missing {', '.join(miss)}" if miss else "")
        # Every other RESULT line is a check of its own.
        for r in results:
            if (r["console"], r["line"]) in referenced:
                continue
            add(f"{r['console']}: {r['name']}" + (f" {r['disk']}" if "disk" in r else ""),
                r["status"] == "pass", logpath(r["console"], r["line"]), r.get("detail", ""))

        # A domain that triple-faulted was restarted under its own name
        # (on_reboot): the scenario's waits and figures then describe
        # something else, however the other checks came out.
        crashes = [s for s in suspects if "triple fault" in s["text"].lower()]
        if crashes:
            c = crashes[0]
            add("no domain triple-faulted", False, logpath(c["console"], c["line"]), c["text"][:120])
        failed = [c for c in checks if c["status"] != "pass"]
        verdict, evidence = self.classify(failed, suspects)
        return {"scenario": self.sc.name, "verdict": verdict,
                "elapsed_s": round(self.elapsed, 1), "timed_out": self.timed_out,
                "scenario_rc": self.done_rc, "qemu_rc": self.qemu_rc,
                "milestones": self.milestones, "checks": checks, "results": results,
                "metrics": metrics, "suspects": suspects, "evidence": evidence,
                "diagnosis": self.diagnosis,
                "passed": len(checks) - len(failed), "failed": len(failed)}


# ---- reporting ------------------------------------------------------------------
def summary(res: dict, run_dir: Path) -> str:
    out = []
    out.append(f"scenario {res['scenario']}: {res['verdict'].upper()} in {res['elapsed_s']} s"
               + (f" (attempt {res['attempt']} of {res['attempts']})" if res.get("attempts", 1) > 1 else ""))
    out.append(f"run folder: {run_dir}")
    ms = res["milestones"]
    if ms:
        out.append("milestones (s since QEMU start): " +
                   ", ".join(f"{k}={v}" for k, v in sorted(ms.items(), key=lambda kv: kv[1])))
    out.append("")
    w = max([len(c["name"]) for c in res["checks"]] + [10])
    for c in res["checks"]:
        line = f"  {c['status'].upper():4}  {c['name']:{w}}"
        if c["status"] != "pass":
            line += f"  -> {c['where']}" + (f"  ({c['detail']})" if c["detail"] else "")
        out.append(line)
    if res["metrics"]:
        cols = sorted({f"{m['console']}" + (f"/{m['disk']}" if 'disk' in m else "") for m in res["metrics"]})
        names = list(dict.fromkeys(m["name"] for m in res["metrics"]))
        table = {}
        units = {}
        for m in res["metrics"]:
            col = f"{m['console']}" + (f"/{m['disk']}" if 'disk' in m else "")
            table[(m["name"], col)] = m["value"]
            units[m["name"]] = m.get("unit", "")
        out.append("")
        nw = max(len(n) for n in names) + 2
        out.append("  " + "metric".ljust(nw) + "unit".ljust(8) + "".join(c.rjust(16) for c in cols))
        for n in names:
            row = "  " + n.ljust(nw) + units[n].ljust(8)
            for c in cols:
                v = table.get((n, c))
                row += (f"{v:g}" if isinstance(v, float) else str(v or "-")).rjust(16)
            out.append(row)
    if res["suspects"]:
        out.append("")
        out.append(f"  {len(res['suspects'])} console line(s) with a fault signature (the verdict says whose):")
        for s in res["suspects"][:10]:
            out.append(f"    {run_dir / (s['console'] + '.log')}:{s['line']}: {s['text'][:100]}")
    verdict_text = {
        "emulator-suspect": "EMULATOR SUSPECT: checks failed and a console shows a fault that "
                            "the backend cannot cause (see ../shared/notes/xen-in-qemu.md)",
        "machine-frozen": "MACHINE FROZEN: the emulated machine stopped (no console line, Xen "
                          "deaf to its debug keys): the emulator, not the code under test",
        "stordom-stalled": "STORDOM STALLED: stordom's own heartbeat or watchdog shows it stuck",
        "domain-fault": "DOMAIN FAULT: a domain triple-faulted in its own state (no emulator "
                        "signature: ours until shown otherwise)",
    }
    if res["verdict"] != "pass":
        out.append("")
        if res["verdict"] in verdict_text:
            out.append(f"  {verdict_text[res['verdict']]}")
        for e in res.get("evidence", []):
            out.append(f"    evidence: {e}")
    if res["verdict"] in ("fail", "stordom-stalled", "domain-fault"):
        failed = [c for c in res["checks"] if c["status"] != "pass"]
        # Prefer a failure that names a line.
        first = next((c for c in failed if re.search(r"\.log:\d+$", c["where"])), failed[0])
        out.append(f"  FAILED: start at {first['where']}")
        logf, _, at = first["where"].partition(":")
        logf = Path(logf)
        if logf.is_file():
            lines = logf.read_text(errors="replace").splitlines()
            if at.isdigit():
                # The line the check points at, and what led to it.
                n = int(at)
                out.append(f"  {logf.name}, lines {max(n - 5, 1)}-{n}:")
                out.extend(f"    {l[:150]}" for l in lines[max(n - 6, 0):n])
            out.append(f"  last lines of {logf.name}:")
            out.extend(f"    {l[:150]}" for l in lines[-8:])
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description="Run a stordom Xen-under-QEMU scenario.")
    ap.add_argument("scenario", help="scenario folder (with scenario.toml), or a name under images/scenarios")
    ap.add_argument("--runs", default=os.environ.get("STORDOM_RUNS", str(REPO / "runs")),
                    help="folder for run folders (default: runs/ at the repo top)")
    ap.add_argument("--retries", type=int, default=1,
                    help="reruns of an emulator-suspect run (default 1)")
    ap.add_argument("--timeout", type=int, help="hard timeout in seconds (default: the scenario's)")
    ap.add_argument("--no-build", action="store_true", help="use the cached images as they are")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="override a scenario [env] value (e.g. SOAK_SECS=1800)")
    ap.add_argument("--cache", default=os.environ.get("STORDOM_IMAGES_CACHE", str(HERE / "cache")))
    a = ap.parse_args()

    # A folder holding a scenario.toml, else a scenario of images/scenarios
    # by name (`net` is also the repository's network crates folder).
    sdir = Path(a.scenario)
    named = HERE / "scenarios" / a.scenario
    if not (sdir / "scenario.toml").exists() and (named / "scenario.toml").exists():
        sdir = named
    sc = Scenario(sdir)
    for kv in a.env:
        name, eq, value = kv.partition("=")
        if not eq or name not in sc.env:
            die(f"--env {kv}: the scenario's [env] has no {name or kv!r} to override")
        sc.env[name] = value
    images = Path(a.cache).resolve() / "out"
    tb = time.monotonic()
    if not a.no_build:
        b = subprocess.run([sys.executable, str(HERE / "build.py"), "--cache", str(Path(a.cache).resolve())])
        if b.returncode != 0:
            die("image build failed (see above)")
    build_s = time.monotonic() - tb
    for f in ("xen.elf", "vmlinuz", sc.cfg["dom0_image"]):
        if not (images / f).exists():
            die(f"{images / f} missing: run images/build.py")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(a.runs).resolve() / f"{stamp}-{sc.name}"
    run_dir.mkdir(parents=True, exist_ok=False)
    timeout = a.timeout or int(sc.cfg["timeout"])
    attempts = 1 + max(0, a.retries)
    res = None
    rerun_why: list[str] = []
    for n in range(1, attempts + 1):
        if n > 1:
            prev = run_dir / f"attempt-{n - 1}"
            prev.mkdir()
            for p in list(run_dir.iterdir()):
                if p.is_file():
                    p.rename(prev / p.name)
            log(f"attempt {n - 1} was {res['verdict']}: its consoles are in {prev}; rerunning")
            rerun_why.append(f"attempt {n - 1} {res['verdict']}: "
                             + "; ".join(res.get("evidence", [])[:1]))
        log(f"scenario {sc.name}: booting QEMU -> Xen -> dom0 (timeout {timeout} s), consoles in {run_dir}")
        at = Attempt(sc, run_dir, images, timeout)
        at.run()
        res = at.evaluate()
        res["attempt"] = n
        if res["verdict"] not in RERUN_VERDICTS or n == attempts:
            break
        # Keep this attempt's own verdict beside its consoles.
        (run_dir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        text = summary(res, run_dir)
        (run_dir / "summary.txt").write_text(text + "\n")
        print(text)
    res["attempts"] = res["attempt"]
    if res["verdict"] in RERUN_VERDICTS and res["attempt"] == attempts:
        log(f"still {res['verdict']} after the last attempt: rerun, or look at the evidence")
    res["reruns"] = res["attempt"] - 1
    res["build_s"] = round(build_s, 1)
    mf = images / "manifest.json"
    if mf.exists():
        m = json.loads(mf.read_text())
        res["images"] = {"kernel": m.get("kernel"), "products": m.get("products"),
                         "xen": m.get("packages", {}).get("xen-hypervisor-4.17-amd64")}
    (run_dir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    if res["failed"] == 0:
        # A passing run's disk images prove nothing more.
        shutil.rmtree(run_dir / "disks", ignore_errors=True)
    text = summary(res, run_dir)
    (run_dir / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"reruns: {res['reruns']}" + (f" ({', '.join(rerun_why)})" if rerun_why else ""))
    print(f"{res['passed']} passed, {res['failed']} failed")
    sys.exit(0 if res["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
