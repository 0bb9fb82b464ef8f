# stordom serves a stock Linux guest's disk, dom0 side.
t0=$(now_ms)
domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
# Ready once it watches backend/vbd (it announces it on its console).
stordom_ready stordom
say "stordom (domid $sd) serving $(( $(now_ms) - t0 )) ms after xl create"

domain_create /scenario/g1.cfg || return 1
g1=$(xl domid g1)
served_by g1 "$sd"
# stordom's per-vbd statistics show up in xenstore while the guest works.
n=0
until [ "$(xenstore-read $be/statistics/wr_req 2>/dev/null || echo 0)" -gt 0 ] \
        && [ "$(xenstore-read $be/statistics/rd_req 2>/dev/null || echo 0)" -gt 0 ]; do
    n=$((n + 1)); [ $n -gt 60 ] && break
    nap 2
done
if [ $n -le 60 ]; then
    xenstore-ls -f $be/statistics | sed 's/^/[dom0]   /'
    result statistics pass "rd_req=$(xenstore-read $be/statistics/rd_req) wr_req=$(xenstore-read $be/statistics/wr_req)"
else
    result statistics fail "no reads and writes counted under $be/statistics within 120 s"
fi
wait_gone g1 240

# The guest is gone: its vbd must be closed and removed, grants released.
n=0
while [ -n "$(xenstore-list /local/domain/$sd/backend/vbd/$g1 2>/dev/null)" ]; do
    n=$((n + 1)); [ $n -gt 100 ] && break
    sleep 0.1
done
if [ -z "$(xenstore-list /local/domain/$sd/backend/vbd/$g1 2>/dev/null)" ]; then
    result vbd-removed:g1 pass
else
    result vbd-removed:g1 fail "backend/vbd/$g1 still there"
fi

xl shutdown stordom
wait_gone stordom 30
