# stordom on a Xen vif, dom0 side: netback and a bridge in dom0, stordom
# with a vif on it; ping, then its metrics endpoint while a guest's vbd
# is connected: the byte counters against what the guest's fio moved,
# /vbds, and a 404.
STORDOM_IP=10.0.0.2
# Reads other than fio's (the guest kernel's partition scan) and writes
# other than fio's (none expected) that the counters may show.
READ_SLACK_KIB=16384
WRITE_SLACK_KIB=1024

modprobe xen-netback && modprobe bridge \
    && brctl addbr xenbr0 \
    && ip addr add 10.0.0.1/24 dev xenbr0 && ip link set xenbr0 up
if [ $? -eq 0 ]; then
    result bridge pass "xenbr0 10.0.0.1/24, netback loaded"
else
    result bridge fail "netback or bridge setup failed"
    return 1
fi

t0=$(now_ms)
domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
stordom_ready stordom || return 1
say "stordom (domid $sd) serving $(( $(now_ms) - t0 )) ms after xl create"

# netback Connected and the hotplug script (vif-bridge) put the vif on
# the bridge.
vif=/local/domain/0/backend/vif/$sd/0
n=0
until [ "$(xenstore-read $vif/state 2>/dev/null)" = 4 ] && [ -e /sys/class/net/xenbr0/brif/vif$sd.0 ]; do
    n=$((n + 1)); [ $n -gt 300 ] && break
    nap 0.2
done
if [ $n -le 300 ]; then
    result vif-connected pass "vif$sd.0 on xenbr0, backend state 4"
else
    result vif-connected fail "backend state '$(xenstore-read $vif/state 2>/dev/null)', bridge ports: $(ls /sys/class/net/xenbr0/brif 2>/dev/null)"
    xenstore-ls -f $vif 2>&1 | sed 's/^/[dom0]   /'
    xenstore-ls -f /local/domain/$sd/device/vif 2>&1 | sed 's/^/[dom0]   /'
    return 1
fi

# The first echo may go to ARP resolution: any reply of five passes.
if ping -c 5 -W 10 $STORDOM_IP >/tmp/ping.txt 2>&1; then
    result ping pass "$(grep -o '[0-9]* packets received' /tmp/ping.txt)"
else
    sed 's/^/[dom0]   /' /tmp/ping.txt
    result ping fail "no echo reply from $STORDOM_IP"
fi

domain_create /scenario/g1.cfg || return 1
g1=$(xl domid g1)
served_by g1 "$sd"
log=$(domain_console g1)
if ! console_line g1 "hold: idle until killed" 900; then
    result metrics-bytes fail "g1 did not finish its integrity job within 900 s"
    xl destroy g1
    return 1
fi
fio_value() {
    sed -n "s/.*METRIC name=$1 disk=xvda value=\([0-9]*\) .*/\1/p" "$log" | tail -n 1
}
fio_read_kib=$(fio_value integrity_read_kib)
fio_write_kib=$(fio_value integrity_write_kib)
say "g1's fio moved ${fio_read_kib:-?} KiB read, ${fio_write_kib:-?} KiB written"

# GET over bash's /dev/tcp: busybox's static wget segfaults here, at the
# same address every time, before it connects (runs/20261207-025220-net).
# Sets HTTP_STATUS; the body goes to BODY_FILE.
http_get() {   # http_get PATH BODY_FILE
    HTTP_STATUS=
    timeout 30 bash -c 'exec 3<>/dev/tcp/$0/80 && printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" "$0" >&3 && cat <&3' \
        $STORDOM_IP "$1" 2>&1 | tr -d '\r' >/tmp/http-response
    HTTP_STATUS=$(head -n 1 /tmp/http-response | awk '{ print $2 }')
    sed '1,/^$/d' /tmp/http-response >"$2"
    [ "$HTTP_STATUS" = 200 ]
}

if http_get /metrics /tmp/metrics; then
    result metrics-fetch pass "$(wc -l </tmp/metrics) lines"
    sed 's/^/[dom0] metrics: /' /tmp/metrics
else
    result metrics-fetch fail "GET http://$STORDOM_IP/metrics: status '$HTTP_STATUS': $(head -n 3 /tmp/http-response)"
fi
labels="frontend=\"$g1\",devid=\"51712\""
metric() {
    grep -F "$1{$labels}" /tmp/metrics 2>/dev/null | awk '{ print $2 }' | head -n 1
}
read_bytes=$(metric stordom_vbd_read_bytes_total)
written_bytes=$(metric stordom_vbd_written_bytes_total)
# Within slack: never less than fio moved, at most the slack more.
within() {   # within COUNTED_BYTES FIO_KIB SLACK_KIB
    [ -n "$1" ] && [ -n "$2" ] && [ "$2" -gt 0 ] \
        && [ $(( $1 / 1024 )) -ge "$2" ] && [ $(( $1 / 1024 - $2 )) -le "$3" ]
}
if within "$read_bytes" "$fio_read_kib" $READ_SLACK_KIB \
        && within "$written_bytes" "$fio_write_kib" $WRITE_SLACK_KIB; then
    result metrics-bytes pass "read $read_bytes B (fio $fio_read_kib KiB), written $written_bytes B (fio $fio_write_kib KiB)"
else
    result metrics-bytes fail "read '$read_bytes' B vs fio '$fio_read_kib' KiB, written '$written_bytes' B vs fio '$fio_write_kib' KiB"
fi

if http_get /vbds /tmp/vbds; then
    sed 's/^/[dom0] vbds: /' /tmp/vbds
    if grep -qF "{\"frontend\": $g1, \"devid\": 51712, \"target\": \"ram:128M\", \"state\": \"Connected\", \"sectors\": 262144}" /tmp/vbds; then
        result vbds pass
    else
        result vbds fail "g1's vbd not listed as expected"
    fi
else
    result vbds fail "GET http://$STORDOM_IP/vbds: status '$HTTP_STATUS'"
fi

http_get /nonexistent /tmp/notfound.txt
if [ "$HTTP_STATUS" = 404 ]; then
    result not-found pass
else
    result not-found fail "status '$HTTP_STATUS': $(head -n 3 /tmp/http-response)"
fi

xl destroy g1
n=0
while [ -n "$(xenstore-list /local/domain/$sd/backend/vbd/$g1 2>/dev/null)" ]; do
    n=$((n + 1)); [ $n -gt 100 ] && break
    nap 0.2
done
grants_released stordom

xl shutdown stordom
wait_gone stordom 30
