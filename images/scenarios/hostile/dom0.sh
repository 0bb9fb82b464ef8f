# Hostile frontends (issue 11): a well-behaved guest (the bystander) runs
# fio verify on one stordom vbd, alone for ALONE_SECS, then for
# ATTACKED_SECS while dom0 plays a hostile blkfront against stordom
# through vbds of its own (hostile-front: every named attack case, then
# random campaigns from HOSTILE_SEED, the first of HOSTILE_COUNT requests,
# more of 2000 each until the bystander's attacked phase is over).
domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
stordom_ready stordom
domain_create /scenario/bystander.cfg || return 1
con=$(domain_console bystander)
n=0
until grep -q "BYSTANDER-ALONE-DONE" "$con" 2>/dev/null; do
    n=$((n + 1))
    if [ $n -gt $(( (ALONE_SECS + 120) * 2 )) ]; then
        result hostile-start fail "the bystander never finished its unloaded phase"
        break
    fi
    nap 0.5
done
say "bystander's unloaded phase over: attacking stordom (domid $sd)"
hostile="/usr/local/bin/hostile-front --grant-slack $GRANT_SLACK $sd"
read -r t0 _ </proc/uptime
$hostile all
read -r t1 _ </proc/uptime
say "named cases took $(( ${t1%.*} - ${t0%.*} )) s"
$hostile random "$HOSTILE_SEED" "$HOSTILE_COUNT"
read -r t2 _ </proc/uptime
say "random campaign of $HOSTILE_COUNT requests took $(( ${t2%.*} - ${t1%.*} )) s"
seed=$HOSTILE_SEED
until grep -q "BYSTANDER-ATTACKED-DONE" "$con" 2>/dev/null || ! xl domid bystander >/dev/null 2>&1; do
    seed=$((seed + 1))
    $hostile random "$seed" 2000 || break
done
wait_gone bystander 120
if [ "$(xl domid stordom 2>/dev/null)" = "$sd" ]; then
    result stordom-same-domain pass "domid $sd throughout"
else
    result stordom-same-domain fail "stordom was domid $sd, now '$(xl domid stordom 2>/dev/null)'"
fi
grants_released stordom
xl shutdown stordom
wait_gone stordom 30
