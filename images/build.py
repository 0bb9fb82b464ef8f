#!/usr/bin/env python3
"""Build the Xen-under-QEMU test images from Debian packages.

Everything lands in the cache folder (images/cache by default, or
$STORDOM_IMAGES_CACHE):

  debs/      the .deb files, fetched by name with `apt-get download`
  trees/     each .deb unpacked with `dpkg -x` (one folder per package version)
  out/       the products:
               xen.elf               Xen hypervisor (multiboot ELF)
               vmlinuz               Linux 6.1 (dom0 and test guest)
               vmlinux               the same kernel as an uncompressed ELF: what
                                     guests boot (libxc would otherwise unxz
                                     ~66 MB in dom0 under TCG on every create)
               guest-initrd.cpio.gz  test guest: busybox, fio, e2fsprogs, jobs
               driverdom.cpio.gz     a Linux storage driver domain (the peer
                                     stordom replaces): xen-blkback, `xl devd`
               dom0.cpio.gz          dom0: xl toolstack, blkback, guest and
                                     driver-domain images
               dom0-hvm.cpio.gz      the same plus the device model, hvmloader and
                                     OVMF, for scenarios with HVM guests
               efi/                  OVMF.fd, grub-mkimage and GRUB's x86_64-efi
                                     modules: images/bare/efi.sh makes a GRUB EFI
                                     image that boots stordom by multiboot2
               manifest.json         resolved package versions, sizes, build times

Package versions are pinned in images/packages.lock ([images] section): the
build takes exactly those and fails, naming the package, when Debian no
longer serves one.  `--repin` moves every pin (host and images) to apt's
newest bookworm / bookworm-security candidate and the newest 6.1 kernel ABI:
a deliberate change, to be tested and committed.  A product is rebuilt only
when its inputs (package versions, the files under images/ it is made from)
change, so a second run reuses the cache.

Usage: build.py [--cache DIR] [--force] [--repin]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "packages.lock"
XEN_VER = "4.17"
ARCH = "amd64"
# Kernel flavour: the newest linux-image-6.1.0-<abi>-amd64 apt knows about.
KERNEL_RE = re.compile(r"^linux-image-(6\.1\.0-(\d+)-amd64)$")

# ---- package sets (names only; apt resolves the versions) -----------------
# Shared runtime pieces.
BASE_PKGS = ["libc6", "busybox-static"]
# dom0: Xen userland + what its programs link against, bash for the hotplug
# scripts, kmod for modprobe, util-linux for flock/losetup.
DOM0_PKGS = BASE_PKGS + [
    f"xen-utils-{XEN_VER}", "xen-utils-common", "xenstore-utils",
    f"libxenmisc{XEN_VER}", "libxencall1", "libxenevtchn1",
    "libxenforeignmemory1", "libxengnttab1", "libxenstore4",
    "libxentoollog1", "libxenhypfs1", "libxendevicemodel1", "libxentoolcore1",
    "libyajl2", "liblzma5", "libuuid1", "zlib1g", "libzstd1",
    "bash", "libtinfo6", "kmod", "libkmod2", "libssl3",
    "util-linux", "mount", "libsmartcols1", "libmount1", "libblkid1", "libselinux1",
    "libpcre2-8-0",
    # xl's pthread_cancel dlopen()s libgcc_s ("libgcc_s.so.1 must be
    # installed for pthread_cancel to work", then abort).
    "libgcc-s1",
]
# dom0 programs whose shared-library closure must be complete.
DOM0_MUST_RUN = [
    f"usr/lib/xen-{XEN_VER}/bin/xl", f"usr/lib/xen-{XEN_VER}/bin/xenstored",
    f"usr/lib/xen-{XEN_VER}/bin/xenconsoled",
    f"usr/lib/xen-{XEN_VER}/bin/xen-init-dom0",
    "usr/bin/xenstore-read", "usr/bin/xenstore-write", "usr/bin/xenstore-ls",
    "bin/bash", "bin/kmod", "usr/bin/flock", "sbin/losetup",
    "lib/x86_64-linux-gnu/libgcc_s.so.1",
]
DOM0_MODULES = [
    "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs",
    "xen-blkback", "xen-blkfront", "loop", "brd", "nvme", "xen-pciback",
    # The net scenario: netback for stordom's vif, a bridge for it
    # (busybox's brctl and ip run the vif-bridge hotplug script).
    "xen-netback", "bridge",
    # The NBD bench: dom0's blkback over the kernel's nbd client.
    "nbd",
]
# The Linux driver domain: dom0's packages (xl devd links all of libxl),
# without the daemons only dom0 runs.
DRIVERDOM_MODULES = ["xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs",
                     "xen-blkback", "loop"]
DRIVERDOM_MUST_RUN = [f"usr/lib/xen-{XEN_VER}/bin/xl", "usr/bin/xenstore-read",
                      "usr/bin/xenstore-write", "bin/bash", "bin/kmod", "usr/bin/flock",
                      "sbin/losetup", "lib/x86_64-linux-gnu/libgcc_s.so.1"]
DRIVERDOM_DROP = [f"usr/lib/xen-{XEN_VER}/bin/xenstored", f"usr/lib/xen-{XEN_VER}/bin/oxenstored",
                  f"usr/lib/xen-{XEN_VER}/bin/xenconsoled",
                  f"usr/lib/xen-{XEN_VER}/bin/xen-init-dom0"]
# test guest: fio (its real runtime needs only libc, libaio, libz, libnuma;
# the ceph/gluster/rdma/pmem/nbd engines are replaced by stubs), e2fsprogs.
# GRUB's EFI loader and OVMF: stordom's multiboot2 entry under EFI.
EFI_PKGS = ["grub-common", "grub-efi-amd64-bin", "ovmf"]
# dom0-hvm: dom0 plus what libxl needs for an HVM guest: the device model
# (QEMU for Xen) and the libraries it links against, hvmloader (shipped by
# xen-utils, dropped from the plain dom0) and OVMF.
# The network scenarios (issue 13): dom0 serves a file with qemu-nbd,
# dom0's Linux blkback reaches the same server through the kernel's nbd
# client (the bench's peer), and curl reads stordom's metrics endpoint.
# Copied with the libraries they need.
NET_PKGS = ["qemu-utils", "nbd-client", "curl", "libcurl4", "libgnutls30", "libselinux1",
            "libnuma1", "liburing2", "libglib2.0-0", "libfuse3-3", "libaio1", "libnettle8",
            "libgmp10", "libhogweed6", "libp11-kit0", "libidn2-0", "libunistring2", "libtasn1-6",
            "libpcre2-8-0", "libffi8", "libnl-3-200", "libnl-genl-3-200", "libnghttp2-14",
            "librtmp1", "libssh2-1", "libpsl5", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3",
            "libkrb5support0", "libkeyutils1", "libldap-2.5-0", "libbrotli1", "libsasl2-2",
            "libcom-err2"]
NET_TOOLS = ["usr/bin/qemu-nbd", "sbin/nbd-client", "usr/bin/curl"]
HVM_PKGS = ["qemu-system-xen", "qemu-system-data", "ovmf", "libbz2-1.0", "libdw1", "libelf1", "libfdt1",
            "libffi8", "libglib2.0-0", "libgstreamer-plugins-base1.0-0",
            "libgstreamer1.0-0", "libjpeg62-turbo", "liblz4-1", "libopus0",
            "liborc-0.4-0", "libpixman-1-0", "libsasl2-2", "libspice-server1",
            "libstdc++6", "libudev1", "libunwind8", "libusb-1.0-0"]
DEVICE_MODEL = "usr/libexec/xen-qemu-system-i386"
# What the device model reads from its data directory: the keymap libxl
# names on its command line, and the option ROMs its -kernel loading uses.
DEVICE_MODEL_DATA = ["keymaps/en-us", "linuxboot.bin", "linuxboot_dma.bin", "kvmvapic.bin"]
HVMLOADER = f"usr/lib/xen-{XEN_VER}/boot/hvmloader"
GUEST_PKGS = BASE_PKGS + [
    "fio", "libaio1", "zlib1g", "libnuma1",
    "e2fsprogs", "libext2fs2", "libcom-err2", "libblkid1", "libuuid1",
    "libss2",
]
GUEST_MODULES = ["xen-blkfront", "ext4", "crc32c_generic"]
# Libraries fio links against only for I/O engines the jobs never use.
FIO_STUB_LIBS = ["libgfapi.so.0", "libnbd.so.0", "libibverbs.so.1",
                 "librdmacm.so.1", "librados.so.2", "librbd.so.1",
                 "libpmemblk.so.1", "libpmem.so.1"]

DROP_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/locale",
             "usr/share/info", "usr/share/lintian", "usr/share/bug",
             "usr/share/bash-completion", "usr/share/zsh",
             "usr/lib/x86_64-linux-gnu/gconv", "usr/share/i18n",
             f"usr/lib/xen-{XEN_VER}/lib/python", f"usr/lib/xen-{XEN_VER}/boot",
             "usr/share/python3", "etc/init.d", "lib/systemd",
             "usr/lib/systemd", "usr/share/X11")

LIBDIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64",
           "usr/lib64", "lib", "usr/lib"]


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def die(msg: str) -> None:
    print(f"[build] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError:
        die(f"command not found: {cmd[0]} (run images/deps.sh)")
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        die(f"command failed ({e.returncode}): {' '.join(map(str, cmd))}\n{err}")


def hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(HERE)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ---- pins -----------------------------------------------------------------
def read_lock() -> dict[str, dict[str, str]]:
    """packages.lock as {section: {package: version}}."""
    if not LOCK.exists():
        die(f"{LOCK} missing: the harness builds only from pinned versions")
    sections: dict[str, dict[str, str]] = {"host": {}, "images": {}}
    cur = None
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            cur = line.strip("[]")
            if cur not in sections:
                die(f"{LOCK}:{n}: unknown section [{cur}]")
            continue
        parts = line.split()
        if cur is None or len(parts) != 2:
            die(f"{LOCK}:{n}: expected 'package version' inside a section")
        sections[cur][parts[0]] = parts[1]
    return sections


def apt_candidates(names: list[str]) -> dict[str, str]:
    out = run(["apt-cache", "policy", *names], capture_output=True, text=True).stdout
    found, cur = {}, None
    for line in out.splitlines():
        if m := re.match(r"^(\S+):$", line):
            cur = m.group(1)
        elif (m := re.match(r"^\s+Candidate:\s+(\S+)", line)) and cur and m.group(1) != "(none)":
            found[cur] = m.group(1)
    missing = [n for n in names if n not in found]
    if missing:
        die(f"apt has no candidate for {' '.join(missing)}: run 'apt-get update' first")
    return found


def repin() -> None:
    """Move every pin to apt's newest candidate (and the newest 6.1 ABI)."""
    out = run(["apt-cache", "pkgnames", "linux-image-6.1.0-"], capture_output=True,
              text=True).stdout.split()
    kernels = sorted((int(m.group(2)), n) for n in out if (m := KERNEL_RE.match(n)))
    if not kernels:
        die("apt knows no linux-image-6.1.0-*-amd64: run 'apt-get update'")
    old = read_lock()
    host = apt_candidates(sorted(old["host"]))
    images = apt_candidates(sorted(set(DOM0_PKGS + GUEST_PKGS + EFI_PKGS + HVM_PKGS + [
        f"xen-hypervisor-{XEN_VER}-{ARCH}", kernels[-1][1]])))
    head = [l for l in LOCK.read_text().splitlines() if l.startswith("#")]
    body = ["", "[host]", *(f"{k} {v}" for k, v in sorted(host.items())),
            "", "[images]", *(f"{k} {v}" for k, v in sorted(images.items()))]
    LOCK.write_text("\n".join(head + body) + "\n")
    for sec, new in (("host", host), ("images", images)):
        for k in sorted(set(new) | set(old[sec])):
            if old[sec].get(k) != new.get(k):
                log(f"pin {k}: {old[sec].get(k, '-')} -> {new.get(k, '-')}")
    log(f"wrote {LOCK}; rebuild, run 'make test', commit the lock with the results")


# ---- package fetching ----------------------------------------------------
class Packages:
    def __init__(self, cache: Path):
        self.debs = cache / "debs"
        self.trees = cache / "trees"
        self.debs.mkdir(parents=True, exist_ok=True)
        self.trees.mkdir(parents=True, exist_ok=True)
        self.versions: dict[str, str] = {}

    def resolve(self, names: list[str]) -> None:
        """Take each package's version from the lock file."""
        pins = read_lock()["images"]
        unpinned = [n for n in dict.fromkeys(names) if n not in pins]
        if unpinned:
            die(f"{' '.join(unpinned)} not pinned in {LOCK}: add them with "
                f"'images/build.py --repin' (see images/README.md, 'Moving the pins')")
        for n in names:
            self.versions[n] = pins[n]

    def deb_path(self, name: str) -> Path | None:
        ver = self.versions[name].replace(":", "%3a")
        for arch in (ARCH, "all"):
            p = self.debs / f"{name}_{ver}_{arch}.deb"
            if p.exists():
                return p
        return None

    def fetch(self, names: list[str]) -> None:
        self.resolve(names)
        todo = [n for n in dict.fromkeys(names) if self.deb_path(n) is None]
        if todo:
            log(f"apt-get download {len(todo)} packages: {' '.join(todo)}")
            got = subprocess.run(["apt-get", "download", "-q",
                                  *[f"{n}={self.versions[n]}" for n in todo]],
                                 cwd=self.debs, capture_output=True, text=True)
            if got.returncode != 0:
                die(f"apt-get download of the pinned versions failed:\n{got.stderr.strip()}\n"
                    f"Debian may no longer serve a pinned version ({LOCK}); 'apt-get update' "
                    f"first, and if it is gone, move the pins on purpose with "
                    f"'images/build.py --repin' (images/README.md, 'Moving the pins')")
            for n in todo:
                if self.deb_path(n) is None:
                    die(f"apt-get download did not produce {n} {self.versions[n]}")

    def tree(self, name: str) -> Path:
        deb = self.deb_path(name)
        assert deb is not None, name
        dest = self.trees / deb.name[:-4]
        if not dest.exists():
            tmp = Path(tempfile.mkdtemp(dir=self.trees, prefix=".x-"))
            run(["dpkg", "-x", str(deb), str(tmp)])
            tmp.rename(dest)
        return dest


# ---- root assembly --------------------------------------------------------
def merge_tree(src: Path, dst: Path) -> None:
    """Copy a package tree into a root, keeping symlinks, skipping docs."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        srel = str(rel)
        if any(srel == d or srel.startswith(d + "/") for d in DROP_DIRS):
            dirnames[:] = []
            continue
        target = dst / rel
        # usr-merge style: if target is a symlink to a dir, follow it.
        target.mkdir(parents=True, exist_ok=True)
        for name in list(dirnames):
            s = Path(dirpath) / name
            if s.is_symlink():
                dirnames.remove(name)
                filenames.append(name)
        for name in filenames:
            s = Path(dirpath) / name
            d = target / name
            if d.is_symlink() or d.exists():
                if d.is_dir() and not d.is_symlink():
                    continue
                d.unlink()
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
            else:
                shutil.copy2(s, d)


def elf_needed(path: Path) -> list[str] | None:
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return None
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def find_lib(root: Path, soname: str) -> Path | None:
    for d in LIBDIRS + [f"usr/lib/xen-{XEN_VER}/lib/x86_64-linux-gnu"]:
        p = root / d / soname
        if p.exists():
            return p
    return None


def check_closure(root: Path, programs: list[str]) -> None:
    missing: dict[str, set[str]] = {}
    seen: set[Path] = set()
    todo = [root / p for p in programs]
    for p in todo:
        if not p.exists():
            die(f"{p.relative_to(root)} is missing from the image")
    while todo:
        p = todo.pop()
        rp = p.resolve()
        if rp in seen:
            continue
        seen.add(rp)
        for so in elf_needed(rp) or []:
            lib = find_lib(root, so)
            if lib is None:
                missing.setdefault(so, set()).add(str(p.relative_to(root)))
            else:
                todo.append(lib)
    if missing:
        lines = [f"  {so} (needed by {', '.join(sorted(users))})" for so, users in sorted(missing.items())]
        die("shared libraries missing from the image; add the Debian packages that "
            "ship them to the package list in images/build.py:\n" + "\n".join(lines))


def copy_with_libs(src_roots: list[Path], dst: Path, files: list[str]) -> None:
    """Copy files from the first src root that has them, plus the shared
    libraries they need (dereferenced, at their original paths)."""
    def locate(rel: str) -> Path | None:
        for r in src_roots:
            if (r / rel).exists():
                return r / rel
        return None

    def locate_lib(so: str) -> tuple[Path, str] | None:
        for r in src_roots:
            for d in LIBDIRS:
                if (r / d / so).exists():
                    return r / d / so, f"{d}/{so}"
        return None

    todo = list(files)
    done: set[str] = set()
    missing = []
    while todo:
        rel = todo.pop()
        if rel in done:
            continue
        done.add(rel)
        src = locate(rel)
        if src is None:
            missing.append(rel)
            continue
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.resolve(), d)
        for so in elf_needed(src.resolve()) or []:
            if (dst / "lib/x86_64-linux-gnu" / so).exists():
                continue
            found = locate_lib(so)
            if found is None:
                missing.append(f"{so} (needed by {rel})")
            else:
                todo.append(found[1])
    if missing:
        die("missing from the package trees: " + ", ".join(missing))


def install_busybox(root: Path, busybox_tree: Path) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    bb = root / "bin/busybox"
    shutil.copy(busybox_tree / "bin/busybox", bb)
    applets = subprocess.run([str(bb), "--list-full"], capture_output=True, text=True).stdout.split()
    for a in applets:
        p = root / a
        if p.exists() or p.is_symlink():
            continue  # a real program from a package wins
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", p)


def skeleton(root: Path) -> None:
    for d in ("proc", "sys", "dev", "tmp", "run", "var/run", "var/log",
              "var/lib", "etc", "root", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    if not (root / "lib64").exists():
        (root / "lib64").mkdir()
    ld = root / "lib64/ld-linux-x86-64.so.2"
    if not ld.exists() and not ld.is_symlink():
        os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", ld)


def add_modules(ktree: Path, kver: str, root: Path, names: list[str]) -> list[str]:
    """Copy modules + their dependency closure; return insmod order."""
    order: list[str] = []
    for name in names:
        out = run(["modprobe", "-d", str(ktree), "-S", kver, "--show-depends", name],
                  capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"^insmod (\S+)", line)
            if not m:
                continue
            ko = Path(m.group(1))
            rel = ko.relative_to(ktree)
            if str(rel) not in order:
                order.append(str(rel))
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ko, root / rel)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        src = ktree / "lib/modules" / kver / f
        if src.exists():
            shutil.copy(src, root / "lib/modules" / kver / f)
    run(["depmod", "-b", str(root), kver])
    return ["/" + o for o in order]


def make_cpio(root: Path, out: Path) -> None:
    """Reproducible newc cpio, gzip'd (fixed mtimes, root-owned)."""
    tmp = out.with_suffix(".tmp")
    epoch = 1700000000
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            os.utime(p, (epoch, epoch), follow_symlinks=False)
    files = subprocess.run("find . -mindepth 1 -print0 | LC_ALL=C sort -z",
                           shell=True, cwd=root, capture_output=True, check=True).stdout
    cp = subprocess.run(["cpio", "--null", "-o", "-H", "newc", "-R", "0:0", "--reproducible",
                         "--quiet"], input=files, cwd=root, capture_output=True)
    if cp.returncode != 0:
        die(f"cpio failed: {cp.stderr.decode(errors='replace')}")
    with open(tmp, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(cp.stdout)
    tmp.rename(out)


# ---- fio stubs ---------------------------------------------------------------
def build_fio_stubs(fio: Path, libdir: Path) -> None:
    """Tiny stand-ins for the libraries of fio's unused engines.

    Debian's fio is linked (BIND_NOW) against ceph, gluster, rdma, pmem and
    nbd: ~80 MB of libraries.  The jobs use only the libaio/psync engines, so
    each of those libraries is replaced by a stub with the same SONAME and
    symbol versions whose functions abort if ever called."""
    syms = subprocess.run(["readelf", "-W", "--dyn-syms", str(fio)], capture_output=True,
                          text=True, check=True).stdout
    verneed = subprocess.run(["readelf", "-W", "-V", str(fio)], capture_output=True,
                             text=True, check=True).stdout
    ver_file: dict[str, str] = {}
    cur = None
    for line in verneed.splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and cur:
            ver_file[m.group(1)] = cur
    per_lib: dict[str, dict[str, list[str]]] = {l: {} for l in FIO_STUB_LIBS}
    unversioned: list[str] = []
    for line in syms.splitlines():
        f = line.split()
        if len(f) < 8 or f[6] != "UND" or f[3] != "FUNC":
            continue
        name = f[7]
        if "@" in name:
            sym, ver = re.split(r"@+", name)[:2]
            ver = re.sub(r"\s*\(\d+\)$", "", ver)
            lib = ver_file.get(ver)
            if lib in per_lib:
                per_lib[lib].setdefault(ver, []).append(sym)
        else:
            unversioned.append(name)
    # Unversioned symbols (ceph's) are looked up in the global scope; any stub
    # that is loaded may define them.  Put them in the ceph stubs.
    kept_libs = {"libc.so.6", "libm.so.6", "libz.so.1", "libaio.so.1", "libnuma.so.1"}
    needed = set(elf_needed(fio) or [])
    unknown = needed - kept_libs - set(FIO_STUB_LIBS)
    if unknown:
        die(f"fio needs libraries this build does not know: {sorted(unknown)}")
    with tempfile.TemporaryDirectory() as td:
        for lib in FIO_STUB_LIBS:
            vers = per_lib[lib]
            src = ['#include <stdio.h>', '#include <stdlib.h>',
                   'static void stub(void) { fputs("stordom fio stub: ' + lib +
                   ' called\\n", stderr); abort(); }']
            allsyms = [s for v in vers.values() for s in v]
            if lib == "librados.so.2":
                allsyms += unversioned
            for s in sorted(set(allsyms)):
                src.append(f'void {s}(void) __attribute__((alias("stub")));')
            c = Path(td) / f"{lib}.c"
            c.write_text("\n".join(src) + "\n")
            cmd = ["gcc", "-shared", "-fPIC", "-O1", "-o", str(libdir / lib), str(c),
                   f"-Wl,-soname,{lib}"]
            if vers:
                vs = Path(td) / f"{lib}.map"
                body = ""
                for v, ss in vers.items():
                    body += f"{v} {{ global: {'; '.join(sorted(set(ss)))}; }};\n"
                if lib == "librados.so.2" and unversioned:
                    body += "{ global: " + "; ".join(sorted(set(unversioned))) + "; local: *; };\n"
                vs.write_text(body)
                cmd.append(f"-Wl,--version-script={vs}")
            run(cmd, capture_output=True)


# ---- products -------------------------------------------------------------
class Builder:
    def __init__(self, cache: Path, force: bool):
        self.cache = cache
        self.out = cache / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.force = force
        self.pk = Packages(cache)
        self.manifest: dict = {"packages": {}, "products": {}, "seconds": {}}
        mf = self.out / "manifest.json"
        if mf.exists():
            try:
                old = json.loads(mf.read_text())
                self.manifest["products"] = old.get("products", {})
            except json.JSONDecodeError:
                pass

    def stamp_ok(self, product: str, key: str) -> bool:
        st = self.out / f".{product}.stamp"
        return (not self.force and (self.out / product).exists() and st.exists()
                and st.read_text() == key)

    def stamp(self, product: str, key: str) -> None:
        (self.out / f".{product}.stamp").write_text(key)

    def key(self, pkgs: list[str], files: list[Path], extra: str = "") -> str:
        h = hashlib.sha256()
        for p in sorted(set(pkgs)):
            h.update(f"{p}={self.pk.versions[p]}\n".encode())
        h.update(hash_files(files).encode())
        h.update(extra.encode())
        h.update(Path(__file__).read_bytes())
        return h.hexdigest()[:20]

    def kernel_pkg(self) -> tuple[str, str]:
        """The pinned kernel package and its ABI name (6.1.0-N-amd64)."""
        found = [(n, m.group(1)) for n in read_lock()["images"] if (m := KERNEL_RE.match(n))]
        if len(found) != 1:
            die(f"{LOCK} must pin exactly one linux-image-6.1.0-N-amd64 (found {len(found)})")
        return found[0]

    def timed(self, name, fn):
        t = time.monotonic()
        did = fn()
        dt = time.monotonic() - t
        self.manifest["seconds"][name] = round(dt, 1)
        p = self.out / name
        if p.exists():
            self.manifest["products"][name] = {"bytes": p.stat().st_size}
        log(f"{name}: {'built' if did else 'cached'} in {dt:.1f}s"
            + (f", {p.stat().st_size / 1e6:.1f} MB" if p.exists() else ""))

    def build(self) -> None:
        t0 = time.monotonic()
        kpkg, kver = self.kernel_pkg()
        self.kver = kver
        self.kpkg = kpkg
        xen_pkg = f"xen-hypervisor-{XEN_VER}-{ARCH}"
        allp = sorted(set(DOM0_PKGS + GUEST_PKGS + EFI_PKGS + HVM_PKGS + NET_PKGS + [xen_pkg, kpkg]))
        self.pk.fetch(allp)
        self.manifest["seconds"]["fetch"] = round(time.monotonic() - t0, 1)
        self.manifest["packages"] = {p: self.pk.versions[p] for p in allp}
        self.manifest["kernel"] = kver
        self.timed("xen.elf", lambda: self.build_xen(xen_pkg))
        self.timed("vmlinuz", self.build_vmlinuz)
        self.timed("vmlinux", self.build_vmlinux)
        self.timed("guest-initrd.cpio.gz", self.build_guest)
        self.timed("driverdom.cpio.gz", self.build_driverdom)
        self.timed("dom0.cpio.gz", lambda: self.build_dom0("dom0.cpio.gz", hvm=False))
        self.timed("dom0-hvm.cpio.gz", lambda: self.build_dom0("dom0-hvm.cpio.gz", hvm=True))
        self.timed("efi", self.build_efi)
        self.manifest["seconds"]["total"] = round(time.monotonic() - t0, 1)
        (self.out / "manifest.json").write_text(json.dumps(self.manifest, indent=1) + "\n")
        log(f"done in {time.monotonic() - t0:.1f}s; products in {self.out}")

    def build_efi(self) -> bool:
        """OVMF and GRUB's EFI image maker with its modules, for
        images/bare/efi.sh (stordom booted by GRUB's multiboot2 loader)."""
        key = self.key(EFI_PKGS, [])
        if self.stamp_ok("efi", key):
            return False
        out = self.out / "efi"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shutil.copy(self.pk.tree("ovmf") / "usr/share/ovmf/OVMF.fd", out / "OVMF.fd")
        shutil.copy(self.pk.tree("grub-common") / "usr/bin/grub-mkimage", out / "grub-mkimage")
        shutil.copytree(self.pk.tree("grub-efi-amd64-bin") / "usr/lib/grub/x86_64-efi",
                        out / "x86_64-efi")
        self.stamp("efi", key)
        return True

    def build_xen(self, pkg: str) -> bool:
        key = self.key([pkg], [])
        if self.stamp_ok("xen.elf", key):
            return False
        t = self.pk.tree(pkg)
        gz = t / f"boot/xen-{XEN_VER}-{ARCH}.gz"
        if not gz.exists():
            die(f"{gz} not in {pkg}")
        tmp = self.out / "xen.elf.tmp"
        tmp.write_bytes(gzip.decompress(gz.read_bytes()))
        tmp.rename(self.out / "xen.elf")
        self.stamp("xen.elf", key)
        return True

    def ktree(self) -> Path:
        t = self.pk.tree(self.kpkg)
        if not (t / "lib/modules" / self.kver / "modules.dep").exists():
            run(["depmod", "-b", str(t), self.kver])
        return t

    def build_vmlinuz(self) -> bool:
        key = self.key([self.kpkg], [])
        if self.stamp_ok("vmlinuz", key):
            return False
        shutil.copy(self.ktree() / f"boot/vmlinuz-{self.kver}", self.out / "vmlinuz")
        self.stamp("vmlinuz", key)
        return True

    def build_vmlinux(self) -> bool:
        key = self.key([self.kpkg], [])
        if self.stamp_ok("vmlinux", key):
            return False
        data = (self.out / "vmlinuz").read_bytes()
        i = data.find(b"\xfd7zXZ\x00")
        if i < 0:
            die("vmlinuz holds no xz payload (kernel compression changed?)")
        elf = lzma.LZMADecompressor().decompress(data[i:])
        if elf[:4] != b"\x7fELF":
            die("vmlinuz's xz payload is not an ELF")
        tmp = self.out / "vmlinux.tmp"
        tmp.write_bytes(elf)
        tmp.rename(self.out / "vmlinux")
        self.stamp("vmlinux", key)
        return True

    def build_guest(self) -> bool:
        files = sorted((HERE / "guest").rglob("*"))
        files = [f for f in files if f.is_file()]
        key = self.key(GUEST_PKGS + [self.kpkg], files)
        if self.stamp_ok("guest-initrd.cpio.gz", key):
            return False
        with tempfile.TemporaryDirectory(dir=self.cache) as td:
            root = Path(td) / "root"
            root.mkdir()
            skeleton(root)
            trees = [self.pk.tree(p) for p in GUEST_PKGS]
            install_busybox(root, self.pk.tree("busybox-static"))
            # fio with stubs for its unused engines' libraries.
            fio_tree = self.pk.tree("fio")
            libdir = root / "lib/x86_64-linux-gnu"
            libdir.mkdir(parents=True, exist_ok=True)
            build_fio_stubs(fio_tree / "usr/bin/fio", libdir)
            for f in ("usr/bin/fio", "sbin/mke2fs", "sbin/e2fsck"):
                if (root / f).is_symlink():  # a busybox applet link
                    (root / f).unlink()
            copy_with_libs(trees, root, ["usr/bin/fio", "sbin/mke2fs", "sbin/e2fsck",
                                         "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"])
            for alias in ("mkfs.ext4",):
                p = root / "sbin" / alias
                if p.exists() or p.is_symlink():
                    p.unlink()
                os.symlink("mke2fs", p)
            for alias in ("fsck.ext4",):
                p = root / "sbin" / alias
                if p.exists() or p.is_symlink():
                    p.unlink()
                os.symlink("e2fsck", p)
            shutil.copy(self.pk.tree("e2fsprogs") / "etc/mke2fs.conf", root / "etc/mke2fs.conf")
            order = add_modules(self.ktree(), self.kver, root, GUEST_MODULES)
            (root / "etc/modules.order").write_text("\n".join(order) + "\n")
            for f in files:
                rel = f.relative_to(HERE / "guest")
                d = root / rel
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, d)
            check_closure(root, ["usr/bin/fio", "sbin/mke2fs", "sbin/e2fsck"])
            run(["ldconfig", "-r", str(root)], capture_output=True)
            os.chmod(root / "init", 0o755)
            make_cpio(root, self.out / "guest-initrd.cpio.gz")
        self.stamp("guest-initrd.cpio.gz", key)
        return True

    def xen_userland(self, root: Path) -> None:
        """dom0's packages (the xl toolstack and what it runs) and busybox
        into an empty root: dom0's and the Linux driver domain's base."""
        for p in DOM0_PKGS:
            if p != "busybox-static":
                merge_tree(self.pk.tree(p), root)
        install_busybox(root, self.pk.tree("busybox-static"))
        skeleton(root)

    def build_driverdom(self) -> bool:
        files = [f for f in sorted((HERE / "driverdom").rglob("*")) if f.is_file()]
        key = self.key(DOM0_PKGS + [self.kpkg], files)
        if self.stamp_ok("driverdom.cpio.gz", key):
            return False
        with tempfile.TemporaryDirectory(dir=self.cache) as td:
            root = Path(td) / "root"
            root.mkdir()
            self.xen_userland(root)
            for rel in DRIVERDOM_DROP:
                (root / rel).unlink()
            add_modules(self.ktree(), self.kver, root, DRIVERDOM_MODULES)
            for f in files:
                shutil.copy2(f, root / f.relative_to(HERE / "driverdom"))
            os.chmod(root / "init", 0o755)
            check_closure(root, DRIVERDOM_MUST_RUN)
            run(["ldconfig", "-r", str(root)], capture_output=True)
            make_cpio(root, self.out / "driverdom.cpio.gz")
        self.stamp("driverdom.cpio.gz", key)
        return True

    def build_dom0(self, product: str, hvm: bool) -> bool:
        files = [f for f in sorted((HERE / "dom0").rglob("*")) if f.is_file()]
        guest = self.out / "guest-initrd.cpio.gz"
        driverdom = self.out / "driverdom.cpio.gz"
        key = self.key(DOM0_PKGS + NET_PKGS + [self.kpkg] + (HVM_PKGS if hvm else []), files,
                       hashlib.sha256(guest.read_bytes() + driverdom.read_bytes()).hexdigest())
        if self.stamp_ok(product, key):
            return False
        with tempfile.TemporaryDirectory(dir=self.cache) as td:
            root = Path(td) / "root"
            root.mkdir()
            self.xen_userland(root)
            for d in ("var/log/xen/console", "var/lib/xen", "var/run/xen",
                      "var/run/xenstored", "var/lib/xenstored", "images", "scenario",
                      "dev/shm"):
                (root / d).mkdir(parents=True, exist_ok=True)
            add_modules(self.ktree(), self.kver, root, DOM0_MODULES)
            if hvm:
                trees = [self.pk.tree(p) for p in HVM_PKGS + DOM0_PKGS if p != "busybox-static"]
                copy_with_libs(trees, root, [DEVICE_MODEL])
                xen_tree = self.pk.tree(f"xen-utils-{XEN_VER}")
                (root / HVMLOADER).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(xen_tree / HVMLOADER, root / HVMLOADER)
                data = self.pk.tree("qemu-system-data") / "usr/share/qemu"
                for rel in DEVICE_MODEL_DATA:
                    (root / "usr/share/qemu" / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(data / rel, root / "usr/share/qemu" / rel)
                (root / "usr/share/ovmf").mkdir(parents=True, exist_ok=True)
                shutil.copy(self.pk.tree("ovmf") / "usr/share/ovmf/OVMF.fd",
                            root / "usr/share/ovmf/OVMF.fd")
            copy_with_libs([self.pk.tree(p) for p in NET_PKGS + DOM0_PKGS if p != "busybox-static"],
                           root, NET_TOOLS)
            check_closure(root, DOM0_MUST_RUN + NET_TOOLS + ([DEVICE_MODEL] if hvm else []))
            shutil.copy(self.out / "vmlinuz", root / "images/vmlinuz")
            shutil.copy(self.out / "vmlinux", root / "images/vmlinux")
            shutil.copy(guest, root / "images/guest-initrd.cpio.gz")
            shutil.copy(driverdom, root / "images/driverdom.cpio.gz")
            for f in files:
                rel = f.relative_to(HERE / "dom0")
                d = root / rel
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, d)
            os.chmod(root / "init", 0o755)
            run(["ldconfig", "-r", str(root)], capture_output=True)
            make_cpio(root, self.out / product)
        self.stamp(product, key)
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=os.environ.get("STORDOM_IMAGES_CACHE", str(HERE / "cache")))
    ap.add_argument("--force", action="store_true", help="rebuild every product")
    ap.add_argument("--repin", action="store_true",
                    help="move packages.lock to apt's newest candidates, then build")
    a = ap.parse_args()
    if a.repin:
        repin()
    Builder(Path(a.cache).resolve(), a.force).build()


if __name__ == "__main__":
    main()
