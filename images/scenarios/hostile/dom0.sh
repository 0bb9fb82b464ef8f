# Hostile frontends (issue 11): a well-behaved guest (the bystander) runs
# fio verify on one stordom vbd, alone for ALONE_SECS, then for
# ATTACKED_SECS while dom0 plays a hostile blkfront against stordom
# through vbds of its own (hostile-front: every named attack case, then
# random campaigns from HOSTILE_SEED, the first of HOSTILE_COUNT requests,
# more of 2000 each until the bystander's attacked phase is over). Then
# the bystander runs I/O at QD64 and dom0 destroys it with its requests in
# flight; with every frontend gone, stordom must hold no grant and its
# heap must be back where it was before the first one came.

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
heap_node=/local/domain/$sd/data/heap-in-use
until heap0=$(xenstore-read $heap_node 2>/dev/null); do nap 0.2; done
say "stordom's heap in use with no vbd: $heap0 bytes"
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
# destroy_in_flight DOMID: `xl destroy` of the bystander (domain DOMID)
# while it runs QD64 I/O on a second vbd (xvdb, attached now that the
# attacks are over: their grant checks must not count its requests). Xen
# keeps a destroyed domain, nameless, for as long as another domain maps
# its pages: its leaving `xl list` shows that stordom let go of every
# grant of it.
destroy_in_flight() {
    local by=$1 st=/local/domain/$sd/backend/vbd/$1/51728/statistics r0 r1 mapped t0 out rc
    if ! timeout 60 xl block-attach bystander "backend=stordom, vdev=xvdb, access=rw, target=ram:32M"; then
        result destroy-in-flight fail "xl block-attach of the bystander's xvdb failed"
        return 1
    fi
    now_s; t0=$now
    until seen "$con" DOOMED-IO-STARTED; do
        now_s
        if [ $((now - t0)) -gt 60 ]; then
            result destroy-in-flight fail "the bystander never started its doomed I/O"
            return 1
        fi
        nap 0.5
    done
    nap 3
    r0=$(( $(xenstore-read $st/rd_req) + $(xenstore-read $st/wr_req) ))
    nap 2
    r1=$(( $(xenstore-read $st/rd_req) + $(xenstore-read $st/wr_req) ))
    mapped=$(xenstore-read /local/domain/$sd/data/grants-mapped)
    if [ "$r1" -le "$r0" ]; then
        result destroy-in-flight fail "no request answered in 2 s of the bystander's QD64 I/O ($r0, then $r1)"
        return 1
    fi
    say "destroying the bystander (domid $by): $((r1 - r0)) requests answered in the last 2 s, stordom maps $mapped grants"
    # libxl waits for the backend to show Closed before it removes the
    # vbd: an error here means stordom did not let it see that.
    out=$(xl destroy bystander 2>&1)
    rc=$?
    [ -n "$out" ] && echo "$out" | sed 's/^/[dom0] xl destroy: /'
    case "$rc:$out" in
        0:*error*|0:*ERROR*|[1-9]*)
            result destroy-in-flight fail "xl destroy: status $rc, $(echo "$out" | tr '\n' ' ')"
            return 1 ;;
    esac
    now_s; t0=$now
    while xl list | awk -v id="$by" 'NR > 1 && $2 == id { found = 1 } END { exit !found }' \
        || xenstore-exists /local/domain/$sd/backend/vbd/$by; do
        now_s
        if [ $((now - t0)) -gt 30 ]; then
            result destroy-in-flight fail "30 s after xl destroy: $(xl list | awk -v id="$by" '$2 == id'), backend: $(xenstore-ls /local/domain/$sd/backend/vbd/$by 2>&1 | head -n 5 | tr '\n' ' ')"
            return 1
        fi
        nap 0.5
    done
    result destroy-in-flight pass "destroyed with QD64 I/O running ($((r1 - r0)) requests in its last 2 s, $mapped grants mapped): domain and vbd gone within $((now - t0 + 1)) s"
}
destroy_in_flight "$(xl domid bystander)"
same_domain stordom "$sd"
grants_released stordom
# Capacities stordom keeps once grown (xenstore's event queue, bounded at
# 64 KiB) are not leaks; anything beyond them is.
heap_slack=65536
n=0
until heap=$(xenstore-read $heap_node) && [ "$heap" -le $((heap0 + heap_slack)) ]; do
    n=$((n + 1)); [ $n -gt 50 ] && break
    nap 0.2
done
if [ "$heap" -le $((heap0 + heap_slack)) ]; then
    result heap-back pass "$heap bytes in use with every frontend gone, $heap0 before the first"
else
    result heap-back fail "$heap bytes in use with every frontend gone, $heap0 before the first (slack $heap_slack)"
fi
xl shutdown stordom
wait_gone stordom 30
