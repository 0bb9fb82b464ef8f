# Soak: three guests run fio with crc32c verify at QD1..QD64, flushes and
# discards on their own stordom vbds for SOAK_SECS, while dom0 attaches and
# detaches a fourth vbd (module 0) over and over, checking across cycles
# the data each cycle left.  Fails on any verify error, any stall over 10 s
# (the guests' watchers; every attach/detach bounded), or stordom not being
# the same domain at the end.
modprobe xen-blkfront || { result setup fail "modprobe xen-blkfront"; return 1; }
truncate -s 16M /tmp/module0.img
domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
stordom_ready stordom
for g in g1 g2 g3; do
    domain_create /scenario/$g.cfg || return 1
done

pattern() {  # pattern CYCLE FILE: 1 MiB of data that names the cycle
    yes "stordom soak churn cycle $1 " | head -c 1048576 >"$2"
}
read -r t0 _ </proc/uptime
t0=${t0%.*}
i=1
churn=pass
while :; do
    read -r now _ </proc/uptime
    [ $(( ${now%.*} - t0 )) -ge "$SOAK_SECS" ] && break
    if ! timeout 30 xl block-attach 0 "backend=stordom, vdev=xvdb, access=rw, target=module:0"; then
        churn="fail attach $i"; break
    fi
    n=0
    until [ -b /dev/xvdb ]; do
        n=$((n + 1)); [ $n -gt 100 ] && break
        nap 0.1
    done
    [ -b /dev/xvdb ] || { churn="fail attach $i: /dev/xvdb did not appear within 10 s"; break; }
    slot=$(( i % 14 + 1 ))
    if [ $i -gt 1 ]; then
        pattern $((i - 1)) /tmp/expected
        rm -f /tmp/found
        dd if=/dev/xvdb of=/tmp/found bs=1M count=1 skip=$(( (i - 1) % 14 + 1 )) iflag=direct 2>/dev/null \
            || { churn="fail read $i: reading /dev/xvdb failed"; break; }
        cmp -s /tmp/found /tmp/expected || { churn="fail data $i: cycle $((i - 1))'s data not found"; break; }
    fi
    pattern $i /tmp/expected
    dd if=/tmp/expected of=/dev/xvdb bs=1M seek=$slot oflag=direct conv=fsync 2>/dev/null \
        || { churn="fail write $i: writing /dev/xvdb failed"; break; }
    if ! timeout 30 xl block-detach 0 xvdb; then
        churn="fail detach $i"; break
    fi
    i=$((i + 1))
    nap 2
done
if [ "$churn" = pass ]; then
    result churn pass "$((i - 1)) attach/detach cycles, data checked across each"
else
    result churn fail "$churn"
fi
for g in g1 g2 g3; do
    wait_gone $g $((SOAK_SECS + 240))
done
same_domain stordom "$sd"
grants_released stordom
xl shutdown stordom
wait_gone stordom 30
