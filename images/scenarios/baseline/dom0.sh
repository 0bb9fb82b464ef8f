# Baseline scenario, dom0 side (sourced by dom0's /init with lib.sh loaded).
G1_DISK=$(ramdisk_loop g1 "$DISK_MIB") || { result setup fail "no ramdisk"; return 1; }
say "g1 disk: $G1_DISK ($DISK_MIB MiB in dom0 RAM)"
domain_create /scenario/g1.cfg || return 1
# Which backend serves the guest's disk: Linux blkback in dom0 (domid 0).
served_by g1 0
wait_gone g1 200
