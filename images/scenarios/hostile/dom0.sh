# Hostile frontends (issue 11): a well-behaved guest (the bystander) runs
# fio verify on one stordom vbd, alone for ALONE_SECS, then for
# ATTACKED_SECS while dom0 plays a hostile blkfront against stordom
# through vbds of its own (hostile-front: every named attack case, then
# random campaigns from HOSTILE_SEED, the first of HOSTILE_COUNT requests,
# more of 2000 each until the bystander's attacked phase is over).

# seen FILE TEXT: whether a line of FILE holds TEXT (builtins only: the
# polls below start no process, see nap).
seen() {
    local line
    [ -r "$1" ] || return 1
    while read -r line || [ -n "$line" ]; do
        case $line in *"$2"*) return 0 ;; esac
    done <"$1"
    return 1
}
# now_s: seconds of uptime into $now.
now_s() { read -r now _ </proc/uptime; now=${now%.*}; }

domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
stordom_ready stordom
domain_create /scenario/bystander.cfg || return 1
con=$(domain_console bystander)
now_s; t0=$now
until seen "$con" BYSTANDER-ALONE-DONE; do
    now_s
    if [ $((now - t0)) -gt $((ALONE_SECS + 120)) ]; then
        result hostile-start fail "the bystander never finished its unloaded phase"
        break
    fi
    nap 0.5
done
say "bystander's unloaded phase over: attacking stordom (domid $sd)"
hostile="/usr/local/bin/hostile-front --grant-slack $GRANT_SLACK $sd"
sd_con=$(domain_console stordom)
lines0=$(wc -l <"$sd_con")
now_s; t1=$now
$hostile all
now_s; t2=$now
say "named cases took $((t2 - t1)) s"
$hostile random "$HOSTILE_SEED" "$HOSTILE_COUNT"
now_s
say "random campaign of $HOSTILE_COUNT requests took $((now - t2)) s"
# Keep attacking while the bystander's attacked phase lasts (bounded, in
# case the bystander died).
seed=$HOSTILE_SEED
until seen "$con" BYSTANDER-ATTACKED-DONE || [ $((now - t1)) -gt $((ATTACKED_SECS + 60)) ]; do
    seed=$((seed + 1))
    $hostile random "$seed" 2000 || break
    now_s
done
# stordom logs at most 10 lines a second per vbd (rate limited); one
# hostile vbd at a time, plus a few unlimited lines per attach.
now_s
lines=$(( $(wc -l <"$sd_con") - lines0 )) secs=$((now - t1 + 1))
if [ $lines -le $((secs * 20)) ]; then
    result stordom-log-rate pass "$lines lines on stordom's console in $secs s of attack"
else
    result stordom-log-rate fail "$lines lines on stordom's console in $secs s of attack (over 20 a second)"
fi
wait_gone bystander 120
if [ "$(xl domid stordom 2>/dev/null)" = "$sd" ]; then
    result stordom-same-domain pass "domid $sd throughout"
else
    result stordom-same-domain fail "stordom was domid $sd, now '$(xl domid stordom 2>/dev/null)'"
fi
grants_released stordom
xl shutdown stordom
wait_gone stordom 30
