# xl block-attach / block-detach ten times in a row against stordom, with
# dom0's own blkfront as the frontend: each cycle checks the data the
# previous one left on the disk (module:0 keeps it across attaches),
# writes its own, and after the detach stordom must hold no grant.
CYCLES=10
modprobe xen-blkfront || { result setup fail "modprobe xen-blkfront"; return 1; }
truncate -s 32M /tmp/module0.img
domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
stordom_ready stordom

pattern() {  # pattern CYCLE FILE: 1 MiB of data that names the cycle
    yes "stordom attach cycle $1 " | head -c 1048576 >"$2"
}

i=1
while [ $i -le $CYCLES ]; do
    if ! xl block-attach 0 "backend=stordom, vdev=xvdb, access=rw, target=module:0"; then
        result attach:$i fail "xl block-attach failed"
        say "stordom's vCPU state (Xen debug key d, on Xen's console):"; xl debug-keys d
        break
    fi
    n=0
    until [ -b /dev/xvdb ]; do
        n=$((n + 1)); [ $n -gt 100 ] && break
        sleep 0.1
    done
    if [ $i -gt 1 ]; then
        # What the previous cycle wrote must still be there.
        pattern $((i - 1)) /tmp/expected
        dd if=/dev/xvdb of=/tmp/found bs=1M count=1 skip=$i iflag=direct 2>/dev/null
        if cmp -s /tmp/found /tmp/expected; then
            result data:$i pass
        else
            result data:$i fail "cycle $((i - 1))'s data not found"
        fi
    fi
    pattern $i /tmp/expected
    dd if=/tmp/expected of=/dev/xvdb bs=1M seek=$((i + 1)) oflag=direct conv=fsync 2>/dev/null
    dd if=/dev/xvdb of=/tmp/found bs=1M count=1 skip=$((i + 1)) iflag=direct 2>/dev/null
    cmp -s /tmp/found /tmp/expected || result readback:$i fail "written data did not read back"
    if ! xl block-detach 0 xvdb; then
        result detach:$i fail "xl block-detach failed"
        say "stordom's vCPU state (Xen debug key d, on Xen's console):"; xl debug-keys d
        say "backend after the failed detach:"; xenstore-ls -fp /local/domain/$sd/backend/vbd 2>&1 | sed 's/^/[dom0]   /'
        say "frontend after the failed detach:"; xenstore-ls -fp /local/domain/0/device/vbd 2>&1 | sed 's/^/[dom0]   /'
        break
    fi
    grants_released stordom grants-released:$i
    i=$((i + 1))
done
[ $i -gt $CYCLES ] && result cycles pass "$CYCLES attach/detach cycles" || result cycles fail "stopped at cycle $i"
xl shutdown stordom
wait_gone stordom 30
