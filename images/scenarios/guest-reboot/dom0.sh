# A guest on stordom reboots (xl re-creates it, so stordom sees its vbd
# go and a new one come) and finds the data it wrote before.
truncate -s 64M /tmp/module0.img
domain_create /scenario/stordom.cfg || return 1
stordom_ready stordom
domain_create /scenario/g1.cfg || return 1
first=$(xl domid g1)
# The first boot reboots; the restarted domain gets a new id.
n=0
now=$first
while [ -z "$now" ] || [ "$now" = "$first" ]; do
    n=$((n + 1)); [ $n -gt 1200 ] && { result reboot:g1 fail "not restarted"; break; }
    sleep 0.1
    now=$(xl domid g1 2>/dev/null)
done
say "g1 rebooted: domid $first -> $now"
wait_gone g1 120
grants_released stordom
xl shutdown stordom
wait_gone stordom 30
