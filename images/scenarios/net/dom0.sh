# stordom on a Xen vif, dom0 side: netback and a bridge in dom0, stordom
# with a vif on it; ping, then its metrics endpoint while a guest's vbd
# is connected: the byte counters against what the guest's fio moved,
# /vbds, and a 404.
STORDOM_IP=10.0.0.2

dom0_bridge || return 1

t0=$(now_ms)
domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
stordom_ready stordom || return 1
say "stordom (domid $sd) serving $(( $(now_ms) - t0 )) ms after xl create"

vif_on_bridge "$sd" || return 1

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
metrics_match_fio g1 $STORDOM_IP || return 1

if http_get $STORDOM_IP /vbds /tmp/vbds; then
    sed 's/^/[dom0] vbds: /' /tmp/vbds
    if grep -qF "{\"frontend\": $g1, \"devid\": 51712, \"target\": \"ram:128M\", \"state\": \"Connected\", \"sectors\": 262144}" /tmp/vbds; then
        result vbds pass
    else
        result vbds fail "g1's vbd not listed as expected"
    fi
else
    result vbds fail "GET http://$STORDOM_IP/vbds: status '$HTTP_STATUS'"
fi

http_get $STORDOM_IP /nonexistent /tmp/notfound.txt
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
