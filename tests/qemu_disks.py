"""QEMU arguments for the emulated disks stordom's drivers are tested on:
an NVMe controller with two namespaces, an AHCI disk (q35's ICH9 HBA) and
a virtio-blk disk, each backed by a sparse raw image in `folder`."""
import os

DISK_MIB = 64
EXPECTED = ["nvme0n1", "nvme0n2", "virtio0", "ahci0p0"]


def disk_args(folder):
    def image(name):
        path = os.path.join(folder, f"{name}.img")
        with open(path, "wb") as f:
            f.truncate(DISK_MIB << 20)
        return path

    return [
        "-drive", f"file={image('ns1')},if=none,id=ns1,format=raw",
        "-drive", f"file={image('ns2')},if=none,id=ns2,format=raw",
        # mdts=9: 2 MiB per command, so 1 MiB transfers go in one.
        "-device", "nvme,id=nvme0,serial=stordom0,mdts=9",
        "-device", "nvme-ns,drive=ns1,bus=nvme0,nsid=1",
        "-device", "nvme-ns,drive=ns2,bus=nvme0,nsid=2",
        "-drive", f"file={image('sata')},if=none,id=sata0,format=raw",
        "-device", "ide-hd,drive=sata0,bus=ide.0",
        "-drive", f"file={image('vd')},if=none,id=vd0,format=raw",
        "-device", "virtio-blk-pci,drive=vd0",
    ]
