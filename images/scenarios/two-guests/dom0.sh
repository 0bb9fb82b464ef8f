# Two guests at once, each on its own RAM-backed disk served by dom0's
# blkback: the shape of a side-by-side comparison (a later scenario puts
# g2 on stordom with backend=stordom and keeps g1 as the reference).
G1_DISK=$(ramdisk_loop g1 "$DISK_MIB") || { result setup fail "no ramdisk"; return 1; }
G2_DISK=$(ramdisk_loop g2 "$DISK_MIB") || { result setup fail "no ramdisk"; return 1; }
domain_create /scenario/g1.cfg || return 1
domain_create /scenario/g2.cfg || return 1
wait_gone g1 230
wait_gone g2 120
