# Two guests at once, each on its own stordom-served disk.
domain_create /scenario/stordom.cfg || return 1
n=0
until grep -q "serve: watching backend/vbd; ready" "$(domain_console stordom)" 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 300 ] && break
    sleep 0.1
done
domain_create /scenario/g1.cfg || return 1
domain_create /scenario/g2.cfg || return 1
wait_gone g1 240
wait_gone g2 120
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
