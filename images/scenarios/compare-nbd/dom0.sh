# stordom over NBD against dom0's Linux blkback over the kernel's nbd
# client (issue 13's bench): one qemu-nbd in dom0 serving one file; dom0
# attaches it as /dev/nbd0 (nbd-client) for its blkback, stordom reaches it
# over its vif; the same guest and throughput job on each, one guest at a
# time, rounds alternating. compare.py prints stordom/dom0.
dom0_bridge || return 1
nbd_server_start || { result nbd-server fail "qemu-nbd did not listen"; return 1; }
result nbd-server pass "pid $NBD_PID, ${NBD_MIB} MiB"
# Its output to a file: the client it leaves running would hold a pipe.
if modprobe nbd && nbd-client 10.0.0.1 10809 /dev/nbd0 -N disk0 -b 512 >/tmp/nbd-client.log 2>&1 \
        && [ "$(cat /sys/block/nbd0/size 2>/dev/null)" = $((NBD_MIB * 2048)) ]; then
    result nbd-client pass "/dev/nbd0: $(cat /sys/block/nbd0/size) sectors"
else
    sed 's/^/[dom0] nbd-client: /' /tmp/nbd-client.log
    result nbd-client fail "/dev/nbd0 not attached ($(cat /sys/block/nbd0/size 2>/dev/null) sectors)"
    return 1
fi
DOM0_DISK=/dev/nbd0
create_backend_timed /scenario/stordom.cfg stordom "serve: watching backend/vbd; ready" 60 || return 1
vif_on_bridge "$(xl domid stordom)" || return 1
for round in 1 2 3; do
    for g in g-dom0 g-stordom; do
        be=${g#g-}
        [ $be = dom0 ] && be=Domain-0
        create_guest_timed /scenario/$g.cfg $g $be || return 1
        wait_gone $g 150
    done
done
xl shutdown stordom
wait_gone stordom 30
nbd-client -d /dev/nbd0
kill $NBD_PID 2>/dev/null
