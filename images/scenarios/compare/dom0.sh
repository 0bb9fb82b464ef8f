# stordom against dom0's blkback, side by side in one run: the same guest
# and throughput job, one after the other (so they do not compete for the
# two host cores), on same-sized RAM disks.
DOM0_DISK=$(ramdisk_loop g-dom0 "$DISK_MIB") || { result setup fail "no ramdisk"; return 1; }
domain_create /scenario/stordom.cfg || return 1
stordom_ready stordom
for round in 1 2; do
    for g in g-dom0 g-stordom; do
        domain_create /scenario/$g.cfg || return 1
        wait_gone $g 150
    done
done
xl shutdown stordom
wait_gone stordom 30
