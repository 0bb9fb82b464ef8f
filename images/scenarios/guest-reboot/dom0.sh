# A guest on stordom reboots (xl re-creates it, so stordom sees its vbd
# go and a new one come) and finds the data it wrote before.
truncate -s 64M /tmp/module0.img
domain_create /scenario/stordom.cfg || return 1
n=0
until grep -q "serve: watching backend/vbd; ready" "$(domain_console stordom)" 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 300 ] && break
    sleep 0.1
done
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
sd=$(xl domid stordom)
n=0
while [ "$(xenstore-read /local/domain/$sd/data/grants-mapped 2>/dev/null)" != 0 ]; do
    n=$((n + 1)); [ $n -gt 50 ] && break
    sleep 0.1
done
mapped=$(xenstore-read /local/domain/$sd/data/grants-mapped 2>/dev/null)
[ "$mapped" = 0 ] && result grants-released pass || result grants-released fail "stordom maps '$mapped' grants"
xl shutdown stordom
wait_gone stordom 30
