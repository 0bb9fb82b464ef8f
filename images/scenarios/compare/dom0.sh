# stordom against dom0's Linux blkback and against a Linux driver domain's
# blkback (the setup stordom replaces), side by side in one run: the same
# guest and throughput job, one after the other (so they do not compete
# for the two host cores), on same-sized RAM disks, rounds alternating.
# Also each driver domain's time from `xl create` to serving, and each
# guest's from `xl create` to its disk Connected, and what stordom's
# serving cost it per request in each of its rounds (its profile).
DOM0_DISK=$(ramdisk_loop g-dom0 "$DISK_MIB") || { result setup fail "no ramdisk"; return 1; }
create_backend_timed /scenario/stordom.cfg stordom "serve: watching backend/vbd; ready" 60 || return 1
create_backend_timed /scenario/linuxdd.cfg linuxdd "driverdom: ready" 180 || return 1
for round in 1 2; do
    for g in g-dom0 g-linuxdd g-stordom; do
        be=${g#g-}
        [ $be = dom0 ] && be=Domain-0
        [ $g != g-stordom ] || stordom_profile_mark stordom
        create_guest_timed /scenario/$g.cfg $g $be || return 1
        wait_gone $g 150
        [ $g != g-stordom ] || stordom_profile_report stordom
    done
done
xl shutdown stordom
xl shutdown linuxdd
wait_gone stordom 30
wait_gone linuxdd 60
