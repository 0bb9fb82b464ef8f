# stordom on a passed-through NVMe against dom0's Linux blkback on dom0's
# own NVMe (the same QEMU device model and size), side by side in one run:
# the same guest and throughput job, alternating, two rounds; and what
# stordom's serving cost it per request in each of its rounds (its profile).
assign_controllers || return 1
# dom0's NVMe is the one at 00:07.0 (its name depends on probe order).
ctrl=$(ls /sys/bus/pci/devices/0000:00:07.0/nvme 2>/dev/null | head -n 1)
DOM0_DISK=/dev/${ctrl}n1
[ -b "$DOM0_DISK" ] || { result setup fail "no block device for dom0's NVMe ($DOM0_DISK)"; return 1; }
say "dom0's reference NVMe: $DOM0_DISK"
# shellcheck disable=SC2086 # a list of PCI functions
start_hvm_stordom $STORDOM_PCI || return 1
for round in 1 2; do
    for g in g-dom0 g-stordom; do
        [ $g != g-stordom ] || stordom_profile_mark stordom
        domain_create /scenario/$g.cfg || return 1
        wait_gone $g 300
        [ $g != g-stordom ] || stordom_profile_report stordom
    done
done
xl shutdown stordom
wait_gone stordom 60
