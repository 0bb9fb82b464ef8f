# In-place restart (issue 12): two guests run the soak job (fio with
# crc32c verify at QD1..QD64, flushes, discards, a stall watcher that fails
# at 10 s without a completion), one on a stordom RAM disk, the other on a
# slice of the NVMe passed through to the HVM stordom, while dom0 restarts
# stordom five times through its control node: a plain request, the panic
# and hang test hooks, mixed.  After each, stordom's restart count went up,
# it is the same domain, and its console has the restart's line with the
# pause the guests saw.
assign_controllers || return 1
# shellcheck disable=SC2086 # a list of PCI functions
start_hvm_stordom $STORDOM_PCI || return 1
restart_control "$sd" || return 1
for g in g1 g2; do
    domain_create /scenario/$g.cfg || return 1
done

started() {  # started GUEST: its soak job's fio is running
    grep -q "soak: $SOAK_SECS s on xvda" "$(domain_console $1)" 2>/dev/null
}
read -r t0 _ </proc/uptime
until started g1 && started g2; do
    read -r now _ </proc/uptime
    if [ $(( ${now%.*} - ${t0%.*} )) -gt 240 ]; then
        result guests-running fail "the soak job did not start in both guests within 240 s"
        return 1
    fi
    nap 1
done
result guests-running pass
nap 15

k=0
for how in "operator request from the restart scenario" panic hang "second operator request" panic; do
    k=$((k + 1))
    restart_in_place "$sd" $k "$how"
    nap 20
done

for g in g1 g2; do
    wait_gone $g $((SOAK_SECS + 240))
done
count=$(xenstore-read /local/domain/$sd/data/restarts 2>/dev/null)
if [ "$count" = 5 ]; then
    result restarts-counted pass "data/restarts = 5"
else
    result restarts-counted fail "data/restarts = '$count' at the end, not 5"
fi
grants_released stordom
xl shutdown stordom
wait_gone stordom 30
